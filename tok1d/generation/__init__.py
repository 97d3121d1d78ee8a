"""Class-conditional generation on tokenizer codes.

  common          label dropout for classifier-free guidance (shared by both generators)
  maskgit         MaskGIT: training masks, masking schedules, iterative parallel decoding
  autoregressive  LlamaGen-style AR: CFG schedules, top-k / top-p, KV-cache sampling
"""
