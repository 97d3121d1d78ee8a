"""tok1d: compact 1D image tokenizers and their generators in JAX/Flax."""
import setuptools

INSTALL_REQUIRES = [
    "jax>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.5",
    "orbax-checkpoint>=0.11.0",
    "grain>=0.2.12",
    "array_record>=0.7.0",
    "tensorflow-datasets>=4.9.7",
    "ml-collections>=1.0.0",
    "clu>=0.0.12",
    "absl-py>=2.1",
    "numpy>=1.26",
    "pillow>=10.0",
    "msgpack>=1.0",
    "tensorboard>=2.16",   # event-file writer only; TensorFlow itself is NOT needed.
    "scikit-image>=0.22",  # bundled photos = the embedded demo dataset.
    "scikit-learn>=1.3",   # bundled digits (demo generator data) + the demo classifier.
    "scipy>=1.10",         # FID's matrix square root (float64).
    "tqdm>=4.60",
]

EXTRAS_REQUIRE = {
    # torch only to write/read .bin checkpoints in the converter tests: the CPU wheel that
    # pip finds for Python 3.11 on x86_64 (tests needing it skip elsewhere).
    # matplotlib: the notebook's plots (tests/test_notebook.py executes it; Colab has it).
    "test": ["pytest>=8.0", "pytest-timeout>=2.2", "pytest-xdist>=3.5", "import-linter>=2.1", "safetensors>=0.4", "matplotlib>=3.7",
             "huggingface_hub>=0.20",
             'torch==2.13.0; python_version == "3.11" and platform_machine == "x86_64"'],
    # Building image datasets with `tfds build` needs TensorFlow; training never does.
    "tfds_build": ["tensorflow-cpu>=2.16"],
    # Reading official .bin/.pt checkpoints; .safetensors/.npz need only NumPy.
    "convert": ["torch>=2.2", "safetensors>=0.4"],
    # notebooks/explore.ipynb's plots (Colab has matplotlib; Jupyter itself is yours).
    "notebook": ["matplotlib>=3.7"],
    # Released weights on the Hugging Face Hub (`tok1d.weights.load("titok_l32")`).
    "hub": ["huggingface_hub>=0.20"],
    # `tok1d bench --workload=input`: the official loaders (torchvision ImageFolder + DataLoader).
    "bench": ["torch>=2.2", "torchvision>=0.17"],
    "gpu": ["jax[cuda12]>=0.10.2"],
    "tpu": ["jax[tpu]>=0.10.2"],
}

setuptools.setup(
    name="tok1d",
    version="0.1.0",
    description="JAX/Flax TPU-first library for compact image tokenizers (TiTok, GigaTok) and generators.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["tok1d", "tok1d.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["tok1d = tok1d.cli.app:console"]},
    license="Apache-2.0",
)
