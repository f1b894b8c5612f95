"""DPO of the 2.4B model with the paper's recipe (paper §4.6): cosine, max LR 4e-6, β = 0.01.

Set `train.init_from` to the SFT run (also the frozen reference) and
`data.preference_files` to the pairs; explicit memory on for policy and reference.
"""

from configs import memory3_2p4b_sft


def get_config():
  c = memory3_2p4b_sft.get_config()
  c.name = "memory3_2p4b_dpo"
  t = c.train
  t.stage = "dpo"
  t.lr = 4e-6
  t.dpo_beta = 0.01
  # One epoch of UltraFeedback Binarized's ~61k pairs (the paper's main DPO data) at batch
  # 512; the paper does not give its step count: set it from prepare-chat's pair count.
  t.steps = 120
  t.warmup_steps = 12
  return c
