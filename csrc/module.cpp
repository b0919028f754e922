// rlora_kernels._C: the schemas of the rlora_C ops (kernels register per device in cpu/ and
// cuda/) and a Python module that carries the build facts compiled.py checks on import.
#include <Python.h>
#include <torch/headeronly/version.h>
#include <torch/library.h>

#define RLORA_STR_(x) #x
#define RLORA_STR(x) RLORA_STR_(x)

// Bumped whenever a schema below changes, so a stale build is refused, not misused.
#define RLORA_C_ABI 1

#ifdef RLORA_WITH_CUDA
#define RLORA_HAS_CUDA 1
#else
#define RLORA_HAS_CUDA 0
#endif

TORCH_LIBRARY(rlora_C, m) {
  // Fake (meta) kernels live in Python, next to the dispatch code that uses the ops.
  m.set_python_module("rlora_kernels.ops.compiled");
  m.def("thin_qr(Tensor a) -> (Tensor, Tensor)");
  m.def("thin_qr_ex(Tensor a, int method) -> (Tensor, Tensor, Tensor)");
  m.def("project_lr(Tensor a_l, Tensor b_r, Tensor p, Tensor q) -> (Tensor, Tensor)");
  m.def("retract_lr(Tensor left, Tensor right, int rank) -> (Tensor, Tensor, Tensor)");
  m.def("ortho_lr(Tensor ad, Tensor bd, Tensor a_l, Tensor b_r, float eps) -> (Tensor, Tensor)");
}

static PyModuleDef rlora_c_module = {
    PyModuleDef_HEAD_INIT, "_C",
    "Compiled rlora_C ops; use them through rlora_kernels.ops.", -1, nullptr,
};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* mod = PyModule_Create(&rlora_c_module);
  if (mod == nullptr) return nullptr;
  const char* torch_version = RLORA_STR(TORCH_VERSION_MAJOR) "." RLORA_STR(
      TORCH_VERSION_MINOR) "." RLORA_STR(TORCH_VERSION_PATCH);
  if (PyModule_AddStringConstant(mod, "torch_version", torch_version) < 0 ||
      PyModule_AddIntConstant(mod, "abi_version", RLORA_C_ABI) < 0 ||
      PyModule_AddIntConstant(mod, "with_cuda", RLORA_HAS_CUDA) < 0) {
    Py_DECREF(mod);
    return nullptr;
  }
  return mod;
}
