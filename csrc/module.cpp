// The Python module sgsc._C: loading it registers the CPU kernels (each file's
// STABLE_TORCH_LIBRARY_IMPL); its three functions report how they run, for `sgsc doctor` and the tests.
//
// Written against Python's limited API (setup.py's py_limited_api), so the one file also serves
// every Python >= 3.10, as the stable ABI lets it serve every torch >= 2.13.

#include <Python.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "isa.h"
#include "stable.h"

namespace sgsc {
namespace {

// The threads torch's parallel loop actually runs this extension's kernels on: 1 when torch was
// built without a parallel backend, else torch.get_num_threads().
int64_t parallel_threads() {
  const int64_t wanted = std::min<int64_t>(num_threads(), 64);
  std::atomic<uint64_t> seen{0};
  parallel_for(0, wanted, 1, [&](int64_t, int64_t) { seen.fetch_or(uint64_t{1} << thread_index()); });
  return __builtin_popcountll(seen.load());
}

PyObject* cpu_isa(PyObject*, PyObject*) { return PyUnicode_FromString(isa_name(active_isa())); }

PyObject* cpu_isa_detected(PyObject*, PyObject*) { return PyUnicode_FromString(isa_name(detected_isa())); }

PyObject* py_parallel_threads(PyObject*, PyObject*) {
  try {
    return PyLong_FromLongLong(parallel_threads());
  } catch (const std::exception& exc) {
    PyErr_SetString(PyExc_RuntimeError, exc.what());
    return nullptr;
  }
}

PyMethodDef methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS,
     "The instruction set the CPU kernels run with: the CPU's best, lowered by SGSC_CPU_ISA."},
    {"cpu_isa_detected", cpu_isa_detected, METH_NOARGS,
     "The best instruction set this CPU supports, whatever SGSC_CPU_ISA asks for."},
    {"parallel_threads", py_parallel_threads, METH_NOARGS, "Threads the CPU kernels' parallel loops run on now."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "sgsc's CPU kernels (LibTorch stable ABI).", -1, methods};

}  // namespace
}  // namespace sgsc

extern "C" PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&sgsc::module); }
