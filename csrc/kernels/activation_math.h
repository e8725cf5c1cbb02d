// Per-element math of the activations, shared by the CPU loops and (later) the CUDA
// kernels. Torch-free: plain scalars only.
//
// For each activation s we need the value s(z), the first derivative s'(z) (tangents
// forward, deltas backward) and the second derivative s''(z) (the exact Hessian's
// curvature term). At kinks each of s, s', s'' takes the branch that autograd's own
// formula for it takes (forward kernel, backward, double backward), which need not be the
// same branch, so the autograd reference and pyflat agree even there.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define PYFLAT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define PYFLAT_HOST_DEVICE inline
#endif

namespace pyflat {

// The one list of activations: X(kind, the name the ops and pyflat/activations.py use,
// whether s'' is non-zero somewhere, i.e. whether the kind adds a term to the exact
// Hessian). The enum, the names the ops accept (glue.h), the curvature test below and the
// kernels' dispatch are generated from it; tests/test_activations.py checks that the
// Python registry lists the same, through pyflat._C.activations.
// Parameters: leaky_relu (negative_slope, 0), softplus (beta, threshold), elu (alpha, 0).
#define PYFLAT_FOR_EACH_ACTIVATION(X) \
  X(Identity, "identity", false)      \
  X(ReLU, "relu", false)              \
  X(LeakyReLU, "leaky_relu", false)   \
  X(Tanh, "tanh", true)               \
  X(Sigmoid, "sigmoid", true)         \
  X(GeluErf, "gelu", true)            \
  X(GeluTanh, "gelu_tanh", true)      \
  X(Softplus, "softplus", true)       \
  X(ELU, "elu", true)                 \
  X(SiLU, "silu", true)

enum class Activation : int32_t {
#define PYFLAT_ACTIVATION_ENUM(KIND, NAME, CURVED) KIND,
  PYFLAT_FOR_EACH_ACTIVATION(PYFLAT_ACTIVATION_ENUM)
#undef PYFLAT_ACTIVATION_ENUM
};

// s' is the constant 1: tangents and deltas pass through unchanged.
PYFLAT_HOST_DEVICE bool activation_is_identity(Activation kind) {
  return kind == Activation::Identity;
}

// s'' vanishes almost everywhere: no curvature term in the exact Hessian.
PYFLAT_HOST_DEVICE bool activation_has_curvature(Activation kind) {
  switch (kind) {
#define PYFLAT_CURVED_CASE(KIND, NAME, CURVED) \
  case Activation::KIND:                       \
    return CURVED;
    PYFLAT_FOR_EACH_ACTIVATION(PYFLAT_CURVED_CASE)
#undef PYFLAT_CURVED_CASE
  }
  return false;
}

template <typename T>
struct ActivationValue {
  T value;
  T first;   // s'(z)
  T second;  // s''(z)
};

// Logistic sigmoid and its derivative without overflow or cancellation:
// with e = exp(-|z|), sigma(z) = 1/(1+e) for z >= 0 and e/(1+e) otherwise, and
// sigma'(z) = e/(1+e)^2, which never forms 1 - sigma (lost in float32 once |z| > 17).
template <typename T>
PYFLAT_HOST_DEVICE void sigmoid_parts(T z, T& sigma, T& sigma_prime) {
  const T e = exp(-fabs(z));
  const T inv = T(1) / (T(1) + e);
  sigma = z >= T(0) ? inv : e * inv;
  sigma_prime = e * inv * inv;
}

template <typename T>
PYFLAT_HOST_DEVICE ActivationValue<T> activation_eval(Activation kind, T z, T param0,
                                                       T param1) {
  ActivationValue<T> out{z, T(1), T(0)};
  switch (kind) {
    case Activation::Identity:
      break;
    case Activation::ReLU:
      // PyTorch: d relu = (relu(z) > 0), so the derivative at 0 is 0.
      out.value = z > T(0) ? z : T(0);
      out.first = z > T(0) ? T(1) : T(0);
      break;
    case Activation::LeakyReLU:
      out.value = z > T(0) ? z : z * param0;
      out.first = z > T(0) ? T(1) : param0;
      break;
    case Activation::Tanh: {
      // 1 - tanh^2 = 4e/(1+e)^2 with e = exp(-2|z|): no cancellation near saturation.
      const T t = tanh(z);
      const T e = exp(T(-2) * fabs(z));
      const T sech2 = T(4) * e / ((T(1) + e) * (T(1) + e));
      out.value = t;
      out.first = sech2;
      out.second = T(-2) * t * sech2;
      break;
    }
    case Activation::Sigmoid: {
      T sigma, sigma_prime;
      sigmoid_parts(z, sigma, sigma_prime);
      out.value = sigma;
      out.first = sigma_prime;
      // sigma'' = sigma' (1 - 2 sigma) = -sigma' tanh(z/2)
      out.second = -sigma_prime * tanh(z * T(0.5));
      break;
    }
    case Activation::GeluErf: {
      // Same expressions as PyTorch's gelu kernels (approximate='none').
      const T cdf = T(0.5) * (T(1) + erf(z * T(0.70710678118654752440)));
      const T pdf = exp(T(-0.5) * z * z) * T(0.39894228040143267794);
      out.value = z * cdf;
      out.first = cdf + z * pdf;
      out.second = pdf * (T(2) - z * z);
      break;
    }
    case Activation::GeluTanh: {
      // u = sqrt(2/pi) (z + kappa z^3), s = z (1 + tanh u) / 2.
      const T beta = T(0.79788456080286535588);
      const T kappa = T(0.044715);
      const T u = beta * (z + kappa * z * z * z);
      const T du = beta * (T(1) + T(3) * kappa * z * z);
      const T ddu = beta * T(6) * kappa * z;
      const T t = tanh(u);
      // (1 + t) / 2 = sigma(2u) and 1 - t^2 = 4 sigma'(2u): the forms of Tanh, which keep
      // the digits that 1 + t and 1 - t*t lose near |t| = 1. The value stays PyTorch's.
      T half_one_plus_t, quarter_sech2;
      sigmoid_parts(T(2) * u, half_one_plus_t, quarter_sech2);
      const T sech2 = T(4) * quarter_sech2;
      out.value = T(0.5) * z * (T(1) + t);
      out.first = half_one_plus_t + T(0.5) * z * sech2 * du;
      out.second = sech2 * (du + T(0.5) * z * (ddu - T(2) * t * du * du));
      break;
    }
    case Activation::Softplus: {
      // PyTorch: linear once beta z > threshold; log1p(exp(beta z)) / beta below. At
      // beta z == threshold, s and s' take the log branch but s'' is 0: autograd's
      // softplus_double_backward masks with beta z < threshold.
      const T bz = param0 * z;
      if (bz > param1) {
        out.value = z;
      } else {
        T sigma, sigma_prime;
        sigmoid_parts(bz, sigma, sigma_prime);
        out.value = log1p(exp(bz)) / param0;
        out.first = sigma;
        out.second = bz < param1 ? param0 * sigma_prime : T(0);
      }
      break;
    }
    case Activation::ELU:
      // PyTorch takes the exponential branch for z <= 0 in s and s' (elu_backward), but
      // autograd's elu_double_backward masks with z < 0, so s''(0) = 0 while s'(0) = alpha.
      // expm1 as PyTorch: alpha exp(z) - alpha cancels for small |z|.
      if (z <= T(0)) {
        const T scaled = param0 * exp(z);
        out.value = param0 * expm1(z);
        out.first = scaled;
        out.second = z < T(0) ? scaled : T(0);
      }
      break;
    case Activation::SiLU: {
      T sigma, sigma_prime;
      sigmoid_parts(z, sigma, sigma_prime);
      out.value = z * sigma;
      out.first = sigma + z * sigma_prime;
      // d/dz [sigma + z sigma'] = 2 sigma' + z sigma'' and sigma'' = -sigma' tanh(z/2)
      out.second = sigma_prime * (T(2) - z * tanh(z * T(0.5)));
      break;
    }
  }
  return out;
}

}  // namespace pyflat
