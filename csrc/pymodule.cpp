// Makes the library importable as `pid_fast._C`; importing it runs the op registrations
// (TORCH_LIBRARY / TORCH_LIBRARY_IMPL static initialisers). The ops live in torch.ops.pid_fast.
#include <Python.h>

static struct PyModuleDef pid_fast_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&pid_fast_module); }
