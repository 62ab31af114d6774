// Load/store of a scalar or a vfloat8/vfloat16 of units, and the loops that run a
// row 8 (or 16) units at a time for float (the tail and double unit by unit): the
// skeleton of the RNN row kernels. No include guard on purpose: it is
// included into each namespace that instantiates rows (rnn_rows.h's avx512 /
// avx2 / generic copies, rnn_layernorm.cpp), so each gets its own
// target-specific copy. Needs <type_traits> and attnkit/gate_math.h.

template <typename V, typename S>
inline V ld(const S* p) {
  if constexpr (std::is_same_v<V, S>) {
    return *p;
  } else {
    V v;
    __builtin_memcpy(&v, p, sizeof(V));
    return v;
  }
}

template <typename V, typename S>
inline void st(S* p, V v) {
  if constexpr (std::is_same_v<V, S>) {
    *p = v;
  } else {
    __builtin_memcpy(p, &v, sizeof(V));
  }
}

// Calls body(V{}, j) over j in [0, n): 8 lanes at a time for float.
template <typename S, typename F>
inline void for_units(int64_t n, F&& body) {
  int64_t j = 0;
  if constexpr (std::is_same_v<S, float>) {
    for (; j + 8 <= n; j += 8) body(gates::vfloat8{}, j);
  }
  for (; j < n; ++j) body(S{}, j);
}

// for_units with 16-lane vectors first (float, when `wide`): one zmm per gate
// where AVX-512 is compiled in, then for_units' 8 and 1.
template <typename S, bool wide = true, typename F>
inline void for_wide_units(int64_t n, F&& body) {
  int64_t j = 0;
  if constexpr (std::is_same_v<S, float> && wide) {
    for (; j + 16 <= n; j += 16) body(gates::vfloat16{}, j);
  }
  for_units<S>(n - j, [&](auto lanes, int64_t i) { body(lanes, j + i); });
}
