"""Records: the data contract's files (`records`), the benchmark generator (`synth`), augmentation and the
pretraining corpus. No models here: a record is plain data.

May import: none.
"""
