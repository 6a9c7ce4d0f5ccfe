// Makes the library importable as `pid_fast._C`; importing it runs the op registrations
// (STABLE_TORCH_LIBRARY / STABLE_TORCH_LIBRARY_IMPL static initialisers). The ops live in
// torch.ops.pid_fast. Only Python's limited API is used (Py_LIMITED_API, set by setup.py's
// py_limited_api): the same binary imports in every CPython from the abi3 tag's version on.
#include <Python.h>

static struct PyModuleDef pid_fast_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&pid_fast_module); }
