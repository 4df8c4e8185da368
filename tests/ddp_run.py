"""Worker for test_distributed: one distill run, launched alone or under torchrun (CPU, gloo)."""

import sys

from transformers import AutoTokenizer

from distillscope.distill.students import build_student
from distillscope.distill.train import DistillConfig, distill, examples_from_records
from distillscope.records import RecordSet

records, tokenizer_dir, out = sys.argv[1:4]
tok = AutoTokenizer.from_pretrained(tokenizer_dir)
config = DistillConfig(exposure="text", steps=4, batch_size=4, grad_accum=2, lr=3e-3, seed=5)
examples = examples_from_records(RecordSet(records), "text", tok)
distill(build_student("micro", tok, seed=0), examples, out, config, tokenizer=tok, progress=False)
