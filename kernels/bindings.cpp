// Python bindings of the msgfm CUDA extension. The module name comes from the
// build (TORCH_EXTENSION_NAME), so the JIT build (msgfm/ops/fused.py) and the
// ahead-of-time build (setup.py, MSGFM_BUILD_KERNELS=1) give the same module.
#include <torch/extension.h>

#include "msgfm_kernels.h"

// Hash of kernels/ at build time (msgfm/ops/kernel_build.py), to detect a stale ahead-of-time build.
#ifndef MSGFM_SOURCE_DIGEST
#define MSGFM_SOURCE_DIGEST unknown
#endif
#define MSGFM_STRINGIFY_(x) #x
#define MSGFM_STRINGIFY(x) MSGFM_STRINGIFY_(x)

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "msgfm fused Swin window attention and window process (CUDA)";
  m.def("window_attention_forward", &msgfm::window_attention_forward,
        "softmax(q k^T * scale + bias + mask) v from qkv [B_, N, 3C] -> (out [B_, N, C], lse [B_, H, N] fp32)",
        py::arg("qkv"), py::arg("bias_table"), py::arg("rel_index"), py::arg("mask"), py::arg("num_heads"),
        py::arg("scale"));
  m.def("window_attention_backward", &msgfm::window_attention_backward,
        "-> (grad_qkv [B_, N, 3C], grad_bias [H, N, N] fp32 summed over windows)", py::arg("grad_out"),
        py::arg("qkv"), py::arg("out"), py::arg("lse"), py::arg("bias_table"), py::arg("rel_index"),
        py::arg("mask"), py::arg("num_heads"), py::arg("scale"));
  m.def("window_partition", &msgfm::window_partition, "[B, H, W, C] -> roll(-shift) -> [B * nW, N, C]",
        py::arg("x"), py::arg("window_size"), py::arg("shift_size"));
  m.def("window_merge", &msgfm::window_merge, "[B * nW, N, C] -> roll(+shift) -> [B, H, W, C]", py::arg("windows"),
        py::arg("window_size"), py::arg("shift_size"), py::arg("height"), py::arg("width"));
  m.attr("max_tokens") = msgfm::kMaxTokens;
  m.attr("source_digest") = MSGFM_STRINGIFY(MSGFM_SOURCE_DIGEST);
}
