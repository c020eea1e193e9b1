"""The attention calls the GPU wants, proven on CPU: packed and padded text reaches SDPA with no mask and
is_causal=True, eager and compiled (the graph dynamo hands a backend is the graph_code TORCH_LOGS prints); isolated
documents keep to themselves at batch > 1 on SDPA and on transformers' flash-attention path; GPT-2's GELU compiles
to one tanh GELU instead of the pow/tanh chain."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F

from entrypoint.config.schema import TrainConfig
from entrypoint.data.collate import PackedCollator, PaddingCollator
from entrypoint.train import model as model_mod
from tests.support.archs import save_tiny_model

SDPA_TARGETS = (torch._C._nn.scaled_dot_product_attention, F.scaled_dot_product_attention)


def load(directory, isolated=False, **options):
    return model_mod.load_model(TrainConfig(model=str(directory), **options),
                                model_mod.attention_for(isolated, "fp32")).eval()


def compiled_graphs(model, batch) -> list[torch.fx.GraphModule]:
    """The FX graphs dynamo traces from one forward (and backward) of `model` on `batch`."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=record)
    compiled(**batch).loss.backward()
    torch._dynamo.reset()
    return graphs


def calls(graphs, targets):
    return [node for gm in graphs for node in gm.graph.nodes if node.op == "call_function" and node.target in targets]


def packed_batch(rows=2, length=64, vocab=512):
    generator = torch.Generator().manual_seed(0)
    return PackedCollator()([{"input_ids": torch.randint(1, vocab, (length,), generator=generator).tolist()}
                             for _ in range(rows)])


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tiny_model):
    return save_tiny_model("llama", tiny_model, tmp_path_factory.mktemp("llama"))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_packed_text_reaches_sdpa_with_no_mask_and_is_causal_when_compiled(arch, tiny_model, llama_dir):
    model = load(tiny_model if arch == "gpt2" else llama_dir)
    sdpa = calls(compiled_graphs(model, packed_batch()), SDPA_TARGETS)
    assert len(sdpa) == 2  # one per layer
    assert all(node.kwargs.get("attn_mask") is None and node.kwargs.get("is_causal") is True for node in sdpa), \
        [node.kwargs for node in sdpa]


def record_sdpa(monkeypatch) -> list[dict]:
    seen = []
    original = F.scaled_dot_product_attention

    def recording(*args, **kwargs):
        seen.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    return seen


def test_packed_and_padded_text_reach_sdpa_with_no_mask_and_is_causal_in_eager_mode(tiny_model, monkeypatch):
    model = load(tiny_model)
    padded = PaddingCollator(0, 64)([{"input_ids": list(range(1, 40))}, {"input_ids": list(range(1, 64))}])
    seen = record_sdpa(monkeypatch)
    model(**packed_batch())
    model(**padded)
    assert len(seen) == 4 and all(k["attn_mask"] is None and k["is_causal"] is True for k in seen)


def test_dropping_the_mask_of_right_padded_rows_leaves_their_loss_unchanged(tiny_model):
    rows = [{"input_ids": list(range(5, 30))}, {"input_ids": list(range(3, 60))}, {"input_ids": [7, 8, 9]}]
    batch = PaddingCollator(0, 64)(rows)
    causal = load(tiny_model)
    masked = model_mod.load_model(TrainConfig(model=str(tiny_model)), "sdpa").eval()
    with torch.no_grad():
        assert masked.config._attn_implementation == "sdpa" and causal.config._attn_implementation == "sdpa_causal"
        assert torch.allclose(causal(**batch).loss, masked(**batch).loss, atol=1e-6)


def test_the_published_model_names_plain_sdpa(tiny_model, tokenizer, tmp_path):
    model_mod.save_published(load(tiny_model), tokenizer, tmp_path / "model")
    from transformers import AutoModelForCausalLM

    published = AutoModelForCausalLM.from_pretrained(tmp_path / "model").config
    assert published._attn_implementation == "sdpa"
    assert published.activation_function == "gelu_new"  # as the base model names it; trained as the tanh GELU


# Isolated documents at batch > 1

DOCUMENTS = [[5, 9, 6], [12, 8]]  # each row's document lengths; both rows 20 tokens


def isolated_rows(vocab=512):
    generator = torch.Generator().manual_seed(1)
    rows, docs = [], []
    for r, lengths in enumerate(DOCUMENTS):
        ids = torch.randint(1, vocab, (sum(lengths),), generator=generator)
        rows.append({"input_ids": ids.tolist(), "position_ids": [p for n in lengths for p in range(n)]})
        starts = torch.tensor([0, *lengths]).cumsum(0).tolist()
        docs += [(r, a, b) for a, b in zip(starts, starts[1:], strict=False)]
    return rows, docs


def document_losses(model, batch, docs) -> torch.Tensor:
    """Each document's mean next-token loss inside the batch, and alone."""
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs).logits
        inside, alone = [], []
        for row, a, b in docs:
            ids = batch["input_ids"][row, a:b]
            inside.append(F.cross_entropy(logits[row, a:b - 1], ids[1:]))
            alone.append(F.cross_entropy(model(input_ids=ids[None]).logits[0, :-1], ids[1:]))
    return torch.stack(inside), torch.stack(alone)


def test_isolated_documents_have_their_solo_loss_at_batch_2_on_sdpa(tiny_model):
    model = load(tiny_model, isolated=True)
    assert model.config._attn_implementation == "sdpa"
    rows, docs = isolated_rows()
    inside, alone = document_losses(model, PackedCollator()(rows), docs)
    assert torch.allclose(inside, alone, atol=1e-5), (inside, alone)


def cpu_flash_kernels():
    """Stand-ins for flash_attn's dense and variable-length kernels, on CPU (layout: tokens, heads, dim)."""

    def dense(q, k, v, causal=True, softmax_scale=None, **_):  # q: batch x tokens x heads x dim
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=causal, scale=softmax_scale)
        return out.transpose(1, 2)

    def varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=True, softmax_scale=None,
               **_):
        assert torch.equal(cu_seqlens_q, cu_seqlens_k) and (cu_seqlens_q.diff() <= max_seqlen_q).all()
        bounds = cu_seqlens_q.tolist()
        return torch.cat([dense(q[None, a:b], k[None, a:b], v[None, a:b], causal, softmax_scale)[0]
                          for a, b in zip(bounds, bounds[1:], strict=False)])

    def process(is_causal, softmax_scale=None, max_seqlen_q=None, max_seqlen_k=None, **_):
        extra = {} if max_seqlen_q is None else {"max_seqlen_q": max_seqlen_q, "max_seqlen_k": max_seqlen_k}
        return {"causal": is_causal, "softmax_scale": softmax_scale, **extra}

    return (dense, varlen, None, None, None), (process, dict)


@pytest.fixture
def cpu_flash(monkeypatch):
    """transformers' own flash-attention integration, under the name `cpu_varlen`, running the CPU kernels above."""
    import transformers.modeling_flash_attention_utils as fa
    from transformers import AttentionInterface
    from transformers.integrations import flash_attention

    monkeypatch.setattr(fa, "lazy_import_flash_attention", lambda *args, **kwargs: cpu_flash_kernels())
    # fp32 here; on a GPU flash runs under autocast, which this otherwise reads (it looks for an nn.Linear to read
    # the dtype from, and GPT-2 has Conv1D layers only).
    monkeypatch.setattr(flash_attention, "get_target_dtype", lambda query, module: None)
    AttentionInterface.register("cpu_varlen", flash_attention.flash_attention_forward)
    return "cpu_varlen"


def test_isolated_documents_have_their_solo_loss_at_batch_2_on_the_flash_attention_path(tiny_model, cpu_flash):
    model = model_mod.load_model(TrainConfig(model=str(tiny_model)), cpu_flash).eval()
    assert model.config._attn_implementation == cpu_flash
    rows, docs = isolated_rows()
    inside, alone = document_losses(model, PackedCollator(varlen=True)(rows), docs)
    assert torch.allclose(inside, alone, atol=1e-5), (inside, alone)
    # Without the spans, transformers' flash path reads position ids only for a batch of one row: documents leak.
    leaked, _ = document_losses(model, PackedCollator(varlen=False)(rows), docs)
    assert (leaked - alone).abs().max() > 1e-3


def test_varlen_spans_mark_every_document_start_across_rows():
    rows, _ = isolated_rows()
    spans = PackedCollator(varlen=True)(rows)
    assert spans["cu_seq_lens_q"].tolist() == [0, 5, 14, 20, 32, 40] and spans["cu_seq_lens_q"].dtype == torch.int32
    assert spans["max_length_q"] == 20
    assert "cu_seq_lens_q" not in PackedCollator(varlen=True)([{"input_ids": [1, 2, 3]}])  # not isolated: no spans


def test_varlen_attention_means_flash_attention_2(tiny_model):
    assert not model_mod.varlen_attention(load(tiny_model, isolated=True))
    model = load(tiny_model)
    model.config._attn_implementation = "flash_attention_2"
    assert model_mod.varlen_attention(model)


# GELU

POW = (torch.pow, operator.pow, torch.Tensor.pow)


def test_gpt2_compiles_to_one_tanh_gelu_with_no_pow_chain(tiny_model):
    graphs = compiled_graphs(load(tiny_model), packed_batch())
    assert not [n for n in calls(graphs, POW) if 3.0 in n.args]
    gelus = calls(graphs, (F.gelu, torch._C._nn.gelu))
    assert len(gelus) == 2 and all(n.kwargs.get("approximate") == "tanh" for n in gelus)
    kept = compiled_graphs(load(tiny_model, tanh_gelu=False), packed_batch())
    assert [n for n in calls(kept, POW) if 3.0 in n.args]  # --no-tanh-gelu: gelu_new's chain, as before


def test_tanh_gelu_gives_the_outputs_of_gelu_new(tiny_model):
    batch = packed_batch()
    with torch.no_grad():
        fast, new = load(tiny_model), load(tiny_model, tanh_gelu=False)
        assert (fast.config.activation_function, new.config.activation_function) == ("gelu_pytorch_tanh", "gelu_new")
        assert torch.allclose(fast(**batch).logits, new(**batch).logits, atol=1e-5)


def test_only_gelu_new_is_replaced():
    from transformers import GPT2Config, LlamaConfig

    assert model_mod.fast_gelu(GPT2Config()) == {"activation_function": "gelu_pytorch_tanh"}
    assert model_mod.fast_gelu(GPT2Config(activation_function="relu")) == {}
    assert model_mod.fast_gelu(LlamaConfig()) == {}


def test_sliding_window_models_keep_sdpa_and_its_mask():
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    assert model_mod.has_local_attention(MistralConfig())  # 4,096-token window by default
    assert not any(model_mod.has_local_attention(c()) for c in (GPT2Config, LlamaConfig, Qwen2Config))
    assert model_mod.has_local_attention(Qwen2Config(use_sliding_window=True, sliding_window=64))


def test_the_job_gives_a_flash_attention_model_the_collator_with_document_spans(tiny_model, tokenizer, tmp_path):
    from entrypoint.train.job import build_trainer
    from entrypoint.train.plan import RunPlan

    cfg = TrainConfig(model=str(tiny_model), output_dir=tmp_path, report_to="none")
    plan = RunPlan(device="cpu", precision="fp32", block_size=32, batch_size=2, grad_accum=1, compile=False,
                   tf32=False, preprocessing_workers=1, dataloader_workers=0, world_size=1)
    model = load(tiny_model, isolated=True)
    collators = []
    for name in ("sdpa", "flash_attention_2"):
        model.config._attn_implementation = name
        trainer, _ = build_trainer(cfg, plan, model, tokenizer, ([], []), fresh=True)
        collators.append(trainer.data_collator)
    assert [c.varlen for c in collators] == [False, True]
