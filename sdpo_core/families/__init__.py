"""Model families (see ``base.py``): one file per diffusers pipeline class."""
