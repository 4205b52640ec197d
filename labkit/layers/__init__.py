"""The layers models are built from: tensor-parallel linear and embedding layers, RMSNorm,
rotary embedding, activations, paged attention (attention/, one backend per implementation),
and the per-engine kernel switches. Each layer is handed its engine's TP group, switches and
workspace when it is built, and names its `profile_category`.

May import: distributed, kernels, observe and the foundation modules; never models or above.
"""
