"""Training, evaluation and sampling scripts for Poolformer, as a package: run them as files
(`accelerate launch training/train.py`) or modules (`python -m training.train`) after `pip install -e ".[train]"`."""
