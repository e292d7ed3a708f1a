"""How big a model is, on paper: closed-form parameter counts (params), model FLOPs per token and the peak
throughput they are measured against (flops), and memory per rank at a parallel layout (memory).

A layer above megatron/model and megatron/parallel: it reads both, and neither imports it, so the model
and the parallel wrappers stay free of the estimators that describe them.
"""
