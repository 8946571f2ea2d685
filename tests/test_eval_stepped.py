"""Perplexity through the generation backend (eval/stepped.py) equals the PyTorch eval-ppl of the same
configuration: the reference decoder's TurboQuant cache (rotation seed + layer for keys and values,
the Lloyd-Max codebooks) is what LayerPlanKVQuantizer computes inside transformers. The ONNX
Runtime side of the same check is in tests/test_llm_session.py and tests/test_eval_ppl_ort.py."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from llama_support import CodeWatch, random_checkpoint, reference_codes  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    return folder, random_checkpoint(folder, seed=3, head_dim=16, hidden_size=64, num_attention_heads=4)


@pytest.mark.parametrize("name", ["mse-k5v3", "mse-4-hadamard"])
def test_stepped_perplexity_of_the_reference_decoder_is_eval_ppl(checkpoint, name, seed, single_thread):
    from tq_deploy.eval.configs import parse_config
    from tq_deploy.eval.kv_quantizers import build_kv_quantizer
    from tq_deploy.eval.perplexity import perplexity
    from tq_deploy.eval.stepped import stepped_perplexity
    from tq_deploy.models import load_decoder
    from tq_deploy.runtime.reference_backend import ReferenceBackend

    folder, hf = checkpoint
    config = parse_config(name)
    rotation_seed = seed % 1000
    decoder = load_decoder(folder, hf_model=hf, k_bits=int(config.k_bits), v_bits=int(config.v_bits), block_size=8,
                           seed=rotation_seed, rotation=config.rotation).model
    ids = torch.randint(0, 96, (1, 45), generator=torch.Generator().manual_seed(seed))
    backend = ReferenceBackend(decoder, 6)
    stepped = stepped_perplexity(backend, ids, 16, return_logits=True)
    watch = CodeWatch(build_kv_quantizer(config, 16, rotation_seed))
    torch_path = perplexity(hf, ids, watch, 16, return_logits=True)
    assert stepped.num_predicted == torch_path.num_predicted == 44
    # the two float32 paths may take neighbouring codes at a rounding tie (about one seed in twenty);
    # the logits agree up to that token, the perplexity then to 1e-3 instead of 1e-5
    flip = watch.first_flip(reference_codes(backend))
    assert stepped.ppl == pytest.approx(torch_path.ppl, rel=1e-5 if flip is None else 1e-3)
    rows = ids.shape[1] if flip is None else flip
    torch.testing.assert_close(stepped.logits[:rows], torch_path.logits[:rows], rtol=1e-4, atol=1e-4)
    # the check can fail: another seed's rotations move the perplexity
    other = perplexity(hf, ids, build_kv_quantizer(config, 16, rotation_seed + 1), 16)
    assert abs(other.ppl / torch_path.ppl - 1) > 1e-4


def test_stepped_perplexity_checks_its_input():
    from tq_deploy.eval.stepped import stepped_perplexity

    class Small:
        block_size, num_blocks = 4, 2

    with pytest.raises(ValueError, match="9 tokens, expected at most the cache's 2 blocks of 4 tokens"):
        stepped_perplexity(Small(), list(range(9)))
    with pytest.raises(ValueError, match="input_ids has 1 tokens, expected >= 2"):
        stepped_perplexity(Small(), [3])
