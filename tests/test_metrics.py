"""selection_recall: exact on a constructed case, sane on a tiny model, plots."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dsa_compile.config import DSAConfig
from dsa_compile.metrics import recall_of_selection, selection_recall


def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, initializer_range=0.2,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


def batches(n, length):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 101, (1, length), generator=g) for _ in range(n)]


def test_recall_of_selection_constructed():
    attention = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05, 0.0],
                              [0.0, 0.0, 0.3, 0.3, 0.4, 0.0]])
    selected = torch.tensor([[0, 2, -1], [2, 4, 5]])
    mass, topk = recall_of_selection(attention, selected, 3)
    torch.testing.assert_close(mass, torch.tensor([0.65, 0.7]))
    # exact top-3: row 0 {0, 1, 2}, row 1 {2, 3, 4}; two of three selected in each.
    torch.testing.assert_close(topk, torch.tensor([2 / 3, 2 / 3]))


def test_selection_recall_tiny_model(tmp_path):
    model = tiny_llama()
    report = selection_recall(model, batches(1, length=63), DSAConfig(top_k=8))
    assert [r.site for r in report.layers] == ["model.layers.0.self_attn",
                                                "model.layers.1.self_attn"]
    for r in report.layers:
        assert 0 < r.attention_recall <= 1 + 1e-6 and 0 <= r.topk_recall <= 1
        assert r.queries == 63 - 8
    full = selection_recall(model, batches(1, length=63), DSAConfig(top_k=62))
    assert all(r.attention_recall > 0.97 for r in full.layers)
    assert "mean" in str(report)
    png = report.plot(tmp_path / "recall.png")
    assert (tmp_path / "recall.png").stat().st_size > 1000 and png.endswith(".png")


def test_harness_modes_are_exact_with_a_full_budget():
    from dsa_compile.evaluation import attention_override

    model = tiny_llama()
    x = batches(1, 63)[0]
    with torch.no_grad():
        ref = model(x).logits
        for mode in ("window", "oracle", "dsa"):
            with attention_override(model, mode, DSAConfig(top_k=63)) as o:
                out = model(x).logits
            assert o.swapped == 2, mode
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        with attention_override(model, "window", DSAConfig(top_k=4)):
            assert not torch.allclose(model(x).logits, ref, atol=1e-3)


def _naive_greedy(model, prompt, steps):
    ids = prompt.clone()
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(ids[None]).logits[0, -1].argmax()[None]])
    return ids[prompt.numel():]


def test_greedy_continuation_equals_step_by_step_decoding_for_any_draft():
    """The draft only saves forwards: right, wrong, short or long, the continuation is
    the model's own greedy one."""
    from dsa_compile.evaluation import greedy_continuation

    model = tiny_llama()
    prompt = batches(1, 37)[0][0]
    want = _naive_greedy(model, prompt, 9)
    wrong = (want + 1) % 101
    mixed = want.clone()
    mixed[[0, 4]] = wrong[[0, 4]]
    for draft in (want, wrong, mixed, want[:3], torch.cat([want, wrong]), want[:0]):
        got = greedy_continuation(model, prompt, draft, 9)
        assert torch.equal(got, want), draft


def test_passkey_reports_found_and_exact():
    """With a character tokenizer, a model that answers the key is found and exact; one
    that answers ' a <key>' (a lead-in within the 2 spare tokens) is found but not exact; one
    that answers 00000 is neither."""
    from dsa_compile import evaluation

    class CharTokenizer:
        def __call__(self, text, return_tensors=None):
            ids = torch.tensor([ord(c) for c in text])
            return type("Encoding", (), {"input_ids": ids[None] if return_tensors else ids})

        def decode(self, ids):
            return "".join(chr(int(i)) for i in ids)

    class Answers(torch.nn.Module):
        """Greedily continues a passkey prompt with ``template`` (``{key}``: the needle's key)."""

        def __init__(self, template):
            super().__init__()
            self.template = template

        def forward(self, ids):
            text = "".join(chr(i) for i in ids[0].tolist())
            key = text[text.index("key is ") + 7 :][:5]
            question = "What is the pass key? The pass key is"
            end = text.index(question) + len(question)  # the prompt's length
            answer = [ord(c) for c in self.template.format(key=key)] + [ord(".")] * 64
            logits = torch.zeros(1, len(text), 128)
            for pos in range(end - 1, len(text)):
                logits[0, pos, answer[pos - end + 1]] = 1.0
            return type("Output", (), {"logits": logits})

    for template, found, exact in ((" {key}", True, True), (" a {key}", True, False),
                                   (" 00000", False, False)):
        res = evaluation.passkey(Answers(template), CharTokenizer(), 300, trials=2)
        assert [r.found for r in res] == [found] * 2, [r.answer for r in res]
        assert [r.exact for r in res] == [exact] * 2, [r.answer for r in res]
