"""Probes of a tokenizer run that fit a model on its codes (`ar`: GigaTok's AR probe); they
use the generator trainer's public entry (`tok1d.train.generator.fit`) and are handed to the
tokenizer trainer by its caller (`tok1d.train.tokenizer.train_and_evaluate(..., ar_probe=)`)."""
