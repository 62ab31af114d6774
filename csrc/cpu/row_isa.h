// Which build of the row kernels this CPU runs. rnn.cpp, rnn_fused.cpp and rnn_layernorm.cpp
// each include their row headers three times, into namespaces `avx512` and `avx2` under
// `#pragma GCC target(...)` (where ATTNKIT_X86_ROW_BUILDS is defined) and into `generic`, and
// call the best one for the CPU at run time: row_isa(), or ATTNKIT_PICK_ROWS(fn) for a function.
#pragma once

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define ATTNKIT_X86_ROW_BUILDS 1
#endif

namespace attnkit {
namespace cpu {

enum class RowIsa { kGeneric, kAvx2, kAvx512 };

inline RowIsa row_isa() {
#ifdef ATTNKIT_X86_ROW_BUILDS
  static const RowIsa best = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") ? RowIsa::kAvx512
                             : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")       ? RowIsa::kAvx2
                                                                                                     : RowIsa::kGeneric;
  return best;
#else
  return RowIsa::kGeneric;
#endif
}

}  // namespace cpu
}  // namespace attnkit

// `fn` from namespace avx512, avx2 or generic (in the caller's scope), as row_isa() says.
#ifdef ATTNKIT_X86_ROW_BUILDS
#define ATTNKIT_PICK_ROWS(fn) \
  (row_isa() == RowIsa::kAvx512 ? avx512::fn : row_isa() == RowIsa::kAvx2 ? avx2::fn : generic::fn)
#else
#define ATTNKIT_PICK_ROWS(fn) (generic::fn)
#endif
