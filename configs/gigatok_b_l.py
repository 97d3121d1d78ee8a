"""GigaTok B-L on ImageNet-1k: the design card's command, kept as a short name for
`configs/gigatok.py:b_l` (that file's docstring has the recipe, weights and targets).

    python -m tok1d.main --config=configs/gigatok_b_l.py --workdir=DIR \
        --config.data.data_dir=/path/to/tensorflow_datasets \
        --config.teacher.weights=dinov2_vitb14_pretrain.pth \
        --config.perceptual.weights=lpips_vgg/
"""

import os

from tok1d.train import config_lib


def get_config():
    return config_lib.load(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                        "gigatok.py:b_l"))
