// The ringfuse._C extension: one m.def per kernel entry, nothing else. Arguments are
// output-first raw pointers (Python ints), sizes, strides (elements), dtype codes and a
// thread count (CPU) or stream handle (CUDA). Validation lives in python/ringfuse/ops;
// C++ re-checks only what would corrupt memory.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "common.h"
#include "cpu/allreduce.h"
#include "cpu/attention.h"
#include "cpu/int8_gemm.h"
#include "cpu/limits.h"
#include "cpu/linear.h"
#include "cpu/memory.h"
#include "cpu/norms.h"
#include "cpu/rotary_embedding.h"
#include "cpu/silu_mul.h"
#include "cpu/vec.h"
#ifdef RINGFUSE_WITH_CUDA
#include <cuda_runtime_api.h>

#include "cuda/allreduce.h"
#include "cuda/norms.h"
#endif

namespace py = pybind11;
namespace rf = ringfuse;
using release_gil = py::call_guard<py::gil_scoped_release>;

static py::dict build_info() {
  py::dict d;
  d["cpu_has_avx2"] = rf::cpu::cpu_has_avx2();
  d["cpu_has_avx512_vnni"] = rf::cpu::cpu_has_avx512_vnni();
  d["cpu_has_avx512_bf16"] = rf::cpu::cpu_has_avx512_bf16();
  d["cpu_has_amx"] = rf::cpu::cpu_has_amx();
  d["isa"] = rf::cpu::isa_name(rf::cpu::active_isa());
  d["int8_gemm_isa"] = rf::cpu::active_isa() == rf::cpu::Isa::kScalar ? "scalar"
                       : rf::cpu::int8_use_vnni()                      ? "avx512vnni"
                                                                         : "avx2";
  d["attention_isa"] = rf::cpu::active_isa() == rf::cpu::Isa::kScalar ? "scalar"
                       : rf::cpu::attention_use_amx()                   ? "amx"
                                                                         : "avx2";
#ifdef _OPENMP
  d["openmp"] = _OPENMP;
#else
  d["openmp"] = py::none();
#endif
  d["compiler"] = __VERSION__;
#ifdef RINGFUSE_WITH_CUDA
  d["cuda"] = true;
  d["cuda_runtime_version"] = CUDART_VERSION;
  d["cuda_archs"] = RINGFUSE_CUDA_ARCHS;
#else
  d["cuda"] = false;
#endif
  return d;
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "ringfuse native kernels (CPU AVX2/OpenMP, optional CUDA)";
  m.def("build_info", &build_info);
  m.def("set_isa", [](const std::string& name) { rf::cpu::set_isa(name.c_str()); },
        "Choose the CPU path: 'auto', 'amx' (avx512vnni + the bf16 prefill attention on AMX tiles), "
        "'avx512vnni' (avx2 + the int8 GEMM's VNNI kernel and AVX-512 prefill attention products), 'avx2' or "
        "'scalar'.");
  m.def("isa", [] { return std::string(rf::cpu::isa_name(rf::cpu::active_isa())); });

  m.def("rms_norm", &rf::cpu::rms_norm, release_gil(), py::arg("out"), py::arg("out_stride"),
        py::arg("residual_out"), py::arg("residual_out_stride"), py::arg("x"), py::arg("x_stride"),
        py::arg("residual"), py::arg("residual_stride"), py::arg("weight"), py::arg("rows"),
        py::arg("hidden"), py::arg("eps"), py::arg("x_dtype"), py::arg("w_dtype"),
        py::arg("out_dtype"), py::arg("llama_cast"), py::arg("num_threads"));
  m.def("layer_norm", &rf::cpu::layer_norm, release_gil(), py::arg("out"), py::arg("out_stride"),
        py::arg("residual_out"), py::arg("residual_out_stride"), py::arg("x"), py::arg("x_stride"),
        py::arg("residual"), py::arg("residual_stride"), py::arg("weight"), py::arg("bias"),
        py::arg("rows"), py::arg("hidden"), py::arg("eps"), py::arg("x_dtype"), py::arg("w_dtype"),
        py::arg("out_dtype"), py::arg("num_threads"));

  m.def("attention", &rf::cpu::attention, release_gil());  // see cpu/attention.h for the arguments
  m.def("write_kv", &rf::cpu::write_kv, release_gil());        // see cpu/attention.h for the arguments
  m.def("decode_attention", &rf::cpu::decode_attention, release_gil(), py::arg("out"), py::arg("out_sb"),
        py::arg("out_sh"), py::arg("q"), py::arg("q_sb"), py::arg("q_sh"), py::arg("k"), py::arg("k_sblk"),
        py::arg("k_sh"), py::arg("k_spos"), py::arg("v"), py::arg("v_sblk"), py::arg("v_sh"), py::arg("v_spos"),
        py::arg("block_table"), py::arg("bt_stride"), py::arg("max_blocks"), py::arg("block_size"),
        py::arg("num_blocks"), py::arg("seq_lens"), py::arg("batch"), py::arg("num_q_heads"),
        py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("scale"), py::arg("softcap"), py::arg("window"),
        py::arg("dtype"), py::arg("split_size"), py::arg("num_threads"));

  m.def("rotary_embedding", &rf::cpu::rotary_embedding, release_gil(), py::arg("x"), py::arg("x_st"),
        py::arg("x_sh"), py::arg("tokens"), py::arg("heads"), py::arg("head_dim"), py::arg("positions"),
        py::arg("cache"), py::arg("cache_stride"), py::arg("max_positions"), py::arg("rot_dim"), py::arg("gptj"),
        py::arg("dtype"), py::arg("num_threads"));

  m.def("silu_mul", &rf::cpu::silu_mul, release_gil(), py::arg("out"), py::arg("out_stride"), py::arg("x"),
        py::arg("x_stride"), py::arg("rows"), py::arg("d"), py::arg("dtype"), py::arg("num_threads"),
        py::arg("activation") = 0);

  m.def("quantize_per_token", &rf::cpu::quantize_per_token, release_gil(), py::arg("q"), py::arg("q_stride"),
        py::arg("scale"), py::arg("x"), py::arg("x_stride"), py::arg("rows"), py::arg("k"), py::arg("dtype"),
        py::arg("num_threads"));

  m.def("int8_packed_size", &rf::cpu::int8_packed_size);
  m.def("int8_pack_b", &rf::cpu::int8_pack_b, release_gil());        // see cpu/int8_gemm.h for the arguments
  m.def("int8_gemm_packed", &rf::cpu::int8_gemm_packed, release_gil());
  m.def("int8_weight_only_linear", &rf::cpu::int8_weight_only_linear, release_gil());

  m.attr("LINEAR_ROW_KERNEL_MAX_M") = rf::cpu::kLinearRowKernelMaxM;
  m.def("linear", &rf::cpu::linear, release_gil(), py::arg("out"), py::arg("out_stride"), py::arg("out_dtype"),
        py::arg("x"), py::arg("x_stride"), py::arg("x_dtype"), py::arg("w"), py::arg("w_stride"), py::arg("w_dtype"),
        py::arg("bias"), py::arg("bias_dtype"), py::arg("m"), py::arg("n"), py::arg("k"), py::arg("num_threads"));

  // CPU shared-memory ring transport (see cpu/allreduce.h): handles are opaque ints; run
  // returns a status (0 ok, 1 timeout, 2 peer gone, 3 mismatch, 4 broken).
  m.def("shm_ring_open", &rf::cpu::shm_ring_open, release_gil(), py::arg("name"), py::arg("rank"), py::arg("world"),
        py::arg("create"), py::arg("slot_bytes"));
  m.def("shm_ring_unlink", &rf::cpu::shm_ring_unlink, py::arg("name"));
  m.def("shm_ring_close", &rf::cpu::shm_ring_close, py::arg("handle"));
  m.def("shm_ring_run", &rf::cpu::shm_ring_run, release_gil(), py::arg("handle"), py::arg("kind"), py::arg("data"),
        py::arg("numel"), py::arg("dtype"), py::arg("op"), py::arg("timeout_ms"), py::arg("num_threads"));
  m.def("shm_ring_last_error", &rf::cpu::shm_ring_last_error, py::arg("handle"));

  m.def("advise_hugepages", &rf::cpu::advise_hugepages, py::arg("ptr"), py::arg("nbytes"));

  m.def("probe_copy", &rf::cpu::probe_copy, release_gil(), py::arg("dst"), py::arg("src"),
        py::arg("nbytes"), py::arg("num_threads"));
  m.def("probe_read", &rf::cpu::probe_read, release_gil(), py::arg("src"), py::arg("nbytes"), py::arg("num_threads"));
  m.def("probe_fma", &rf::cpu::probe_fma, release_gil(), py::arg("iters"), py::arg("num_threads"));
  m.def("probe_fma_flops_per_iter", &rf::cpu::probe_fma_flops_per_iter, py::arg("num_threads"));
  m.def("probe_fma_lanes", &rf::cpu::probe_fma_lanes);
  m.def("probe_int8_dot", &rf::cpu::probe_int8_dot, release_gil(), py::arg("iters"), py::arg("num_threads"));
  m.def("probe_int8_ops_per_iter", &rf::cpu::probe_int8_ops_per_iter, py::arg("num_threads"));

#ifdef RINGFUSE_WITH_CUDA
  m.def("rms_norm_cuda", &rf::cuda::rms_norm, release_gil());
  m.def("layer_norm_cuda", &rf::cuda::layer_norm, release_gil());

  // NCCL ring transport (see cuda/allreduce.h): libnccl.so.2 is loaded at run time; handles
  // are opaque ints; run returns a status (0 ok, 1 timeout / NCCL error, 4 broken).
  m.def("nccl_load", &rf::cuda::nccl_load, release_gil(), py::arg("path"));
  m.def("nccl_unique_id", [] { return py::bytes(rf::cuda::nccl_unique_id()); });
  m.def("nccl_comm_open", &rf::cuda::nccl_comm_open, release_gil(), py::arg("unique_id"), py::arg("rank"),
        py::arg("world"), py::arg("device"), py::arg("piece_bytes") = int64_t(4) << 20,
        py::arg("timeout_ms") = int64_t(60000));
  m.def("nccl_comm_close", &rf::cuda::nccl_comm_close, release_gil(), py::arg("handle"), py::arg("abort") = false);
  m.def("nccl_ring_run", &rf::cuda::nccl_ring_run, release_gil(), py::arg("handle"), py::arg("kind"), py::arg("data"),
        py::arg("numel"), py::arg("dtype"), py::arg("op"), py::arg("stream"), py::arg("timeout_ms"));
  m.def("nccl_last_error", &rf::cuda::nccl_last_error, py::arg("handle"));
#endif
}
