"""The MaskGIT-VQGAN tokenizer (256 codes of 1024 per 256x256 image) as a tokenizer config, for
`tok1d.cli.bench --workload=sample --config=configs/rar.py:b
--tokenizer_config=benchmarks/maskgit_vqgan_tokenizer.py`: RAR decodes its samples with it. tok1d
does not train this model (it is converted: `tok1d convert maskgit_vqgan`), so this config exists
to build it with random weights for speed measurements; sizes are the model's defaults."""
from tok1d.train import config_lib


def get_config(arg: str = ""):
    del arg
    config = config_lib.base_config("tokenizer")
    config.precision = "bfloat16"  # as the recipes' tokenizers decode
    config.data.image_size = 256
    config.model = dict(name="maskgit_vqgan")
    return config
