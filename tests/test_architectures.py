"""The tuners on the models people fine-tune (tiny random configs, no download): SAM (gradient and magnitude
selection), MPO, CaliSr(LoRA), CaliSr(SAM) and CaliSr(MPO) x BERT, RoBERTa, DistilBERT, ALBERT (shared layers),
ELECTRA, DeBERTa-v2, GPT-2 (Conv1D), Llama (causal LM, tied embeddings), Qwen2, T5 (seq2seq, tied embeddings), ViT
and a plain MLP: two training steps, then disable == base, merge/unmerge == forward, a second adapter and back,
delete, save -> PeftModel.from_pretrained and transformers' ``load_adapter`` give the same outputs (CaliSr: refused
with a clear error, by design), merge_and_unload == forward."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf
from peft import LoraConfig, PeftModel, get_peft_model

import peft_sam

VOCAB = 64


class MLP(torch.nn.Module):
    """PEFT's toy model shape: a plain nn.Sequential body and a classifier head (loss and logits like transformers)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Linear(10, 20), torch.nn.ReLU(), torch.nn.LayerNorm(20), torch.nn.Linear(20, 20), torch.nn.ReLU()
        )
        self.classifier = torch.nn.Linear(20, 2)

    def forward(self, x, labels=None):
        from types import SimpleNamespace

        logits = self.classifier(self.body(x))
        loss = None if labels is None else torch.nn.functional.cross_entropy(logits, labels)
        return SimpleNamespace(loss=loss, logits=logits)


def _model(name: str):
    torch.manual_seed(0)
    if name == "mlp":
        return MLP(), None
    enc = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
               max_position_embeddings=40, vocab_size=VOCAB, num_labels=2)  # fmt: skip
    dec = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=32, vocab_size=VOCAB)  # fmt: skip
    if name == "bert":
        return tf.BertForSequenceClassification(tf.BertConfig(**enc)), "SEQ_CLS"
    if name == "roberta":
        return tf.RobertaForSequenceClassification(tf.RobertaConfig(pad_token_id=1, **enc)), "SEQ_CLS"
    if name == "distilbert":
        config = tf.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=48, max_position_embeddings=32,
                                     vocab_size=VOCAB, num_labels=2)  # fmt: skip
        return tf.DistilBertForSequenceClassification(config), "SEQ_CLS"
    if name == "albert":
        return tf.AlbertForSequenceClassification(tf.AlbertConfig(embedding_size=16, **enc)), "SEQ_CLS"
    if name == "electra":
        return tf.ElectraForSequenceClassification(tf.ElectraConfig(embedding_size=16, **enc)), "SEQ_CLS"
    if name == "deberta-v2":
        return tf.DebertaV2ForSequenceClassification(tf.DebertaV2Config(**enc)), "SEQ_CLS"
    if name == "gpt2":
        config = tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=32, pad_token_id=0, vocab_size=VOCAB,
                               num_labels=2)  # fmt: skip
        return tf.GPT2ForSequenceClassification(config), "SEQ_CLS"
    if name == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(tie_word_embeddings=True, **dec)), "CAUSAL_LM"
    if name == "qwen2":
        return tf.Qwen2ForSequenceClassification(tf.Qwen2Config(pad_token_id=0, num_labels=2, **dec)), "SEQ_CLS"
    if name == "t5":
        config = tf.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                             decoder_start_token_id=0)  # fmt: skip
        return tf.T5ForConditionalGeneration(config), "SEQ_2_SEQ_LM"
    config = tf.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                          image_size=16, patch_size=8, num_labels=2)  # fmt: skip
    return tf.ViTForImageClassification(config), None


def _batch(name: str) -> dict:
    gen = torch.Generator().manual_seed(0)
    if name == "mlp":
        return {"x": torch.randn(2, 10, generator=gen), "labels": torch.tensor([0, 1])}
    if name == "vit":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=gen), "labels": torch.tensor([0, 1])}
    ids = torch.randint(2, VOCAB, (2, 8), generator=gen)
    if name == "t5":
        return {"input_ids": ids, "labels": torch.randint(2, VOCAB, (2, 5), generator=gen)}
    if name == "llama":
        return {"input_ids": ids, "labels": ids}
    return {"input_ids": ids, "labels": torch.tensor([0, 1])}


def _config(tuner: str, task: str | None, name: str, seed: int = 0):
    head = ["classifier"] if name in ("vit", "mlp") else None  # no PEFT task type for these heads
    if tuner == "sam":
        return peft_sam.SAMConfig(p=0.05, task_type=task, modules_to_save=head, seed=seed)
    if tuner == "sam_magnitude":
        return peft_sam.SAMConfig(p=0.05, selection="magnitude", init_weights=False, task_type=task,
                                  modules_to_save=head, seed=seed)  # fmt: skip
    if tuner == "mpo":
        return peft_sam.MPOConfig(init_weights=False, task_type=task, modules_to_save=head, seed=seed)
    inner = {
        "calisr_lora": LoraConfig(r=2, target_modules="all-linear"),
        "calisr_sam": peft_sam.SAMConfig(p=0.05, selection="magnitude"),
        "calisr_mpo": peft_sam.MPOConfig(),
    }[tuner]
    return peft_sam.CaliSrConfig(adapter=inner, init_weights=False, task_type=task, modules_to_save=head, seed=seed)


def _outputs(model, batch):
    with torch.no_grad():
        return model(**batch).logits


ARCHITECTURES = [
    "bert", "roberta", "distilbert", "albert", "electra", "deberta-v2", "gpt2", "llama", "qwen2", "t5", "vit", "mlp",
]  # fmt: skip
TUNERS = ["sam", "sam_magnitude", "mpo", "calisr_lora", "calisr_sam", "calisr_mpo"]


@pytest.mark.parametrize("tuner", TUNERS)
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_train_disable_save_load_merge(name: str, tuner: str, tmp_path) -> None:
    base, task = _model(name)
    batch = _batch(name)
    if name == "distilbert" and tuner == "calisr_lora":
        # LoRA "all-linear" adapts DistilBERT's pre_classifier, which PEFT's SEQ_CLS head matching also claims:
        # PEFT's own LoRA raises the same error on this model, with this target
        with pytest.raises(TypeError, match="modules_to_save cannot be applied"):
            get_peft_model(base, _config(tuner, task, name))
        return
    model = get_peft_model(base, _config(tuner, task, name))
    if tuner == "sam":
        peft_sam.select_parameters(model, [batch, batch], show_progress=False)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    adapted = _outputs(model, batch)
    with model.disable_adapter():
        disabled = _outputs(model, batch)
    base_outputs = _outputs(_model(name)[0].eval(), batch)
    torch.testing.assert_close(disabled, base_outputs, atol=1e-6, rtol=0)
    assert not torch.allclose(adapted, base_outputs, atol=1e-6)
    model.merge_adapter()
    torch.testing.assert_close(_outputs(model, batch), adapted, atol=1e-4, rtol=0)
    model.unmerge_adapter()
    torch.testing.assert_close(_outputs(model, batch), adapted, atol=1e-5, rtol=0)
    second = _config(tuner, task, name, seed=3)
    if tuner == "sam":
        second.selection = "random"  # no calibration batches for the second one
    model.add_adapter("other", second)
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    heads = [m for m in model.modules() if isinstance(m, ModulesToSaveWrapper)]
    assert not any(isinstance(m, BaseTunerLayer) for head in heads for m in head.modules())  # heads train in full
    model.set_adapter("other")
    assert not torch.allclose(_outputs(model, batch), adapted, atol=1e-6)
    model.set_adapter("default")
    torch.testing.assert_close(_outputs(model, batch), adapted, atol=1e-6, rtol=0)
    model.delete_adapter("other")
    torch.testing.assert_close(_outputs(model, batch), adapted, atol=1e-6, rtol=0)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(_model(name)[0], tmp_path).eval()
    torch.testing.assert_close(_outputs(loaded, batch), adapted, atol=1e-6, rtol=0)
    if name != "mlp":  # transformers' load_adapter (a transformers model only)
        hf = _model(name)[0]
        if tuner.startswith("calisr"):  # by design: its wrapped tensors carry the wrapped method's names
            with pytest.raises(NotImplementedError, match="PeftModel.from_pretrained"):
                hf.load_adapter(str(tmp_path))
        else:
            hf.load_adapter(str(tmp_path))
            torch.testing.assert_close(_outputs(hf.eval(), batch), adapted, atol=1e-6, rtol=0)
    merged = copy.deepcopy(model).merge_and_unload()
    assert not any(isinstance(m, (peft_sam.SAMLayer, peft_sam.MPOLayer)) for m in merged.modules())
    torch.testing.assert_close(_outputs(merged, batch), adapted, atol=1e-4, rtol=0)
