"""The paper's tables reproduced side by side with the usual alternatives (`sgsc experiment ...`).

Each experiment writes one JSON file under ``results/``; :mod:`sgsc.experiments.report` renders
RESULTS.md from those files alone, so every number in it comes from a recorded run.
"""
