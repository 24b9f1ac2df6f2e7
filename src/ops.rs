//! The kernel boundary: tensor-level ops that check shapes and dispatch on the tensor's device.
//! Models call these; each backend implements them. Adding a backend adds match arms here and
//! nothing in `nn` or `model`.
