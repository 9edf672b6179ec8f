"""Data: what a run trains on, and how it is served.

- config.py      the dataset group's schemas (imports no torch)
- loaders.py     DataBundle and the loaders: a seeded order per epoch, DDP shards, exact resume, the data wait
- images.py      digits, synthetic, torchvision's MNIST/CIFAR, image folders
- text.py        text corpora as byte (or character) windows for language models (pycode, textfile)
- textfolder.py  labelled texts as token ids for text classifiers
- user.py        a project's own (train, val) datasets by _target_: checked, and served by mprun's loaders
"""
