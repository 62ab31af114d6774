// Load/store of a scalar or a vfloat8 of 8 units, and the loop that runs a
// row 8 units at a time for float (the tail and double unit by unit): the
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
