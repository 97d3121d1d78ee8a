"""The official training recipes' hyperparameters -> tok1d configs.

A user who wants to reproduce an official run (or check tok1d against it) starts from the
official configuration -- TiTok / MaskGIT / RAR YAML files of bytedance/1d-tokenizer, GigaTok's
`configs/vq/*.yaml` + `vq_train.py` arguments, LlamaGen / GigaTok `train_c2i.py` arguments and
`ModelArgs` -- and gets the tok1d `ml_collections` config that trains the same way: the same
model sizes, losses and weights, optimizer groups, LR schedule and its stepping, clipping, EMA
and discriminator schedule. The train-step parity tests build every model and optimizer
through these functions from what the fixtures record (`meta`), so the mapping is tested.

One module per official code base / trainer: `titok` (TiTok stage 1 / stage 2 / single
stage), `maskgit` (TiTok's MaskGIT generators), `rar` (RAR, the same repository's randomized
AR generators), `gigatok` (GigaTok tokenizers), `gpt` (GigaTok / LlamaGen class-conditional
GPT).
"""
