"""Class-conditional generation on tokenizer codes (training losses: `tok1d.objectives.tokens`).

  common          the sampler of a generator's objective; class labels to sample
  maskgit         MaskGIT: iterative parallel decoding
  autoregressive  LlamaGen-style GPT and RAR: CFG schedules, top-k / top-p, KV-cache sampling
  guidance        CFG scale schedules shared by the samplers (power-cosine)
  decode          SampleDecoder: samples decoded to images by any tokenizer
"""
