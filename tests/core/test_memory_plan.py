"""The memory plan counts a quantized embedding and head (core.embed_head): the head's gradient and float32
Fisher during the loss gradients at the top, and the tables' k-means at the end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.errors import UserError
from core.memory_plan import LOGITS_COPIES, TABLE_KMEANS_BYTES_PER_WEIGHT, activation_budget, plan_for

ROOT = Path(__file__).resolve().parents[2]
MIB = 1 << 20


def _model(vocab: int = 49152, hidden: int = 128, tied: bool = True):  # 6-bit tables pay from 128 wide
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=tied)
    return LlamaForCausalLM(config).eval()


def test_a_quantized_heads_gradient_fisher_and_kmeans_are_counted_only_when_it_is_quantized():
    vocab, hidden, seqlen = 49152, 128, 128
    n = vocab * hidden
    model = _model(vocab, hidden)
    kept = plan_for(model, 4, seqlen, embed_bits=16, head_bits=16)
    quantized = plan_for(model, 4, seqlen, embed_bits=6, head_bits=6)
    assert kept.head_fisher == 0 and kept.embed_head_quantize == 0
    assert "Fisher" not in kept.describe() and "k-means" not in kept.describe()
    # float32 model: the gradient, the Fisher sum and the squared gradient, 4 bytes each per weight
    assert quantized.head_fisher == 3 * 4 * n
    assert kept.top == LOGITS_COPIES * seqlen * vocab * 4  # one window's logits
    assert quantized.top == max(kept.top + 4 * n, quantized.head_fisher)  # the Fisher sum is held meanwhile
    assert quantized.embed_head_quantize == TABLE_KMEANS_BYTES_PER_WEIGHT * n + 4 * n  # + the Fisher read back
    assert quantized.cpu_peak > kept.cpu_peak
    assert "the head's gradient and Fisher" in quantized.describe() and "k-means" in quantized.describe()
    # a tied pair is stored at the larger width: 6 / 16 keeps it in float16, nothing to plan
    assert plan_for(model, 4, seqlen, embed_bits=6, head_bits=16).embed_head_quantize == 0
    untied = _model(vocab, hidden, tied=False)
    embedding_only = plan_for(untied, 4, seqlen, embed_bits=6, head_bits=16)  # no head Fisher: unweighted
    assert embedding_only.head_fisher == 0 and embedding_only.embed_head_quantize == TABLE_KMEANS_BYTES_PER_WEIGHT * n
    no_fisher = plan_for(model, 4, seqlen, fisher=False, embed_bits=6, head_bits=6)  # rtn: k-means unweighted
    assert no_fisher.head_fisher == 0 and no_fisher.embed_head_quantize == TABLE_KMEANS_BYTES_PER_WEIGHT * n


MEASURE = r"""
import sys, tempfile, torch
from pathlib import Path
from transformers import LlamaConfig, LlamaForCausalLM
from core.activation_store import ActivationStore
from core.block_pass import BlockMajorPass
from core.lazy_model import LazyModel
from core.progress import run_to_end

def status(field):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(field))

vocab, hidden, seqlen = map(int, sys.argv[1:4])
torch.manual_seed(0)
config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=seqlen,
                     tie_word_embeddings=sys.argv[4] == "tied")
folder = Path(tempfile.mkdtemp()) / "m"
LlamaForCausalLM(config).save_pretrained(folder)
lazy = LazyModel.open(folder)
passer = BlockMajorPass(lazy, torch.randint(0, vocab, (3, seqlen)), torch.device("cpu"),
                        ActivationStore(1 << 30, folder / "spill"))
passer.prepare()
run_to_end(passer.forward_sweep(len(lazy.blocks)))
before = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
run_to_end(passer.top_gradients(head_fisher=True))
print(status("VmHWM:") - before)
"""


@pytest.mark.parametrize("hidden,seqlen", [(512, 128), (256, 512)], ids=["head-heavy", "logits-heavy"])
def test_the_planned_loss_gradients_match_what_the_process_allocates(hidden, seqlen):
    """Peak RSS of BlockMajorPass.top_gradients(head_fisher=True) in a fresh process whose heap returns every
    freed tensor (a fixed mmap threshold), against the plan's ``top``: on a head of 49152 x 512 (96 MiB per
    float32 copy) its gradient, Fisher and squared gradient; on 49152 x 256 with 512-token windows the logits
    (3 x 96 MiB) beside the Fisher sum."""
    import os

    vocab = 49152
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    rise = int(subprocess.run([sys.executable, "-c", MEASURE, str(vocab), str(hidden), str(seqlen), "tied"], cwd=ROOT,
                              env=env, capture_output=True, text=True, check=True).stdout.split()[-1])
    plan = plan_for(_model(vocab, hidden), 3, seqlen, embed_bits=6, head_bits=6)
    head = 4 * vocab * hidden
    assert plan.top == (3 * head if hidden == 512 else 3 * seqlen * vocab * 4 + head)
    # measured 290.5 MiB against 288 planned (head-heavy), 339.3 against 336 (logits-heavy)
    assert 0.95 * plan.top <= rise <= plan.top + 16 * MIB, (rise / MIB, plan.top / MIB)


def test_a_run_whose_embedding_kmeans_does_not_fit_is_refused_naming_float16():
    plan = plan_for(_model(), 4, 128, embed_bits=6, head_bits=6)
    sweep = plan.outside_blocks + plan.runtime + plan.sweep
    assert plan.without_block_inputs > sweep  # the tiny model's table k-means outweighs its blocks
    with pytest.raises(UserError, match=r"--embed-bits 16 --head-bits 16"):
        activation_budget(plan, cpu_memory=sweep + 1, available=1 << 40)
    budget = activation_budget(plan, cpu_memory=plan.without_block_inputs, available=1 << 40)
    assert budget == plan.without_block_inputs - sweep  # the block inputs may use what the end needs anyway
