// The activation codes of the C++ kernels (normkit.activations.code makes them; act.h has the math):
// bits 0..7 the kind; for leaky ReLU and ELU, the parameter as the exact decimal m·10^−k, k in bits 8..11 and
// the signed integer m in bits 12..63 (|m| < 2^51). Light on purpose: both translation units include it.
#pragma once

#include <cstdint>

namespace normkit {

enum {
  kIdentity = 0,
  kRelu = 1,
  kSilu = 2,
  kGelu = 3,       // exact (erf) GELU
  kGeluTanh = 4,   // nn.GELU(approximate="tanh")
  kHardswish = 5,
  kLeakyRelu = 6,  // parameter: negative_slope
  kRelu6 = 7,
  kHardsigmoid = 8,
  kMish = 9,
  kElu = 10,       // parameter: alpha
  kTanh = 11,
  kSigmoid = 12,
  kNumActs = 13
};

inline bool act_has_param(int64_t kind) { return kind == kLeakyRelu || kind == kElu; }

struct ActCode {
  int kind;
  double param;  // 0 for the kinds without one
};

inline ActCode decode_act(int64_t code) {
  static constexpr double kPow10[16] = {1e0, 1e1, 1e2,  1e3,  1e4,  1e5,  1e6,  1e7,
                                        1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15};
  const int kind = static_cast<int>(code & 0xff);
  const int k = static_cast<int>((code >> 8) & 0xf);
  const int64_t m = code >> 12;  // arithmetic shift: the sign of m kept
  return {kind, static_cast<double>(m) / kPow10[k]};
}

// A code the kernels know: a kind below kNumActs, and no parameter bits on a kind without a parameter
inline bool act_code_ok(int64_t code) {
  const int64_t kind = code & 0xff;
  return code >= 0 ? (kind < kNumActs && (act_has_param(kind) || code == kind))
                   : act_has_param(kind);  // a negative parameter (m < 0) makes the code negative
}

}  // namespace normkit
