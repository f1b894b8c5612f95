"""Supervised fine-tuning of the 2.4B model with the paper's recipe (paper §4.5).

Cosine schedule, max LR 5e-5, 10% warmup, weight decay 0.1, batch 512 sequences of 2048
tokens, 3 epochs of ~1.29M chats (`train.steps` = 3 x sequences / 512 for your data),
samples over 8 rounds dropped; explicit memory on (docs/model.md "Post-training"). Set
`train.init_from` to the continual run and `data.chat_files` to the chats.
"""

from configs import memory3_2p4b


def get_config():
  c = memory3_2p4b.get_config()
  c.name = "memory3_2p4b_sft"
  c.data.chat_tokens = True
  c.data.chat_max_rounds = 8
  c.data.batch_size = 512
  t = c.train
  t.stage = "sft"
  t.chat_memory = True
  t.schedule = "cosine"
  t.lr = 5e-5
  t.min_lr_ratio = 0.0
  # 3 epochs of the paper's 1,286,938 chats at one chat per sequence: 3 * 1286938 / 512
  # (packing several short chats into a sequence needs fewer; set it from prepare-chat's count)
  t.steps = 7541
  t.warmup_steps = 754  # 10%
  t.weight_decay = 0.1
  return c
