"""RoBERTa (the SAM paper's model family): merge_and_unload with a head that has no ``weight`` in modules_to_save."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import RobertaConfig, RobertaForSequenceClassification

from peft_sam import CaliSrConfig, MPOConfig, SAMConfig


def _roberta() -> RobertaForSequenceClassification:
    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=48, max_position_embeddings=40, num_labels=2, pad_token_id=1)  # fmt: skip
    return RobertaForSequenceClassification(config).eval()


def _config(kind: str):
    if kind == "sam":
        return SAMConfig(p=0.05, selection="magnitude", init_weights=False, task_type="SEQ_CLS")
    if kind == "mpo":
        return MPOConfig(init_weights=False, task_type="SEQ_CLS")
    if kind == "calisr_sam":
        return CaliSrConfig(adapter=SAMConfig(p=0.05, selection="magnitude"), init_weights=False, task_type="SEQ_CLS")
    return CaliSrConfig(adapter=LoraConfig(r=2, target_modules=["query", "value"]), init_weights=False,
                        task_type="SEQ_CLS")  # fmt: skip


@pytest.mark.parametrize("kind", ["sam", "mpo", "calisr_lora", "calisr_sam"])
def test_merge_and_unload_with_the_roberta_classification_head(kind: str) -> None:
    model = get_peft_model(_roberta(), _config(kind)).eval()
    ids = torch.randint(2, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    assert not torch.allclose(expected, base)
    merged = model.merge_and_unload()
    assert type(merged.classifier).__name__ == "RobertaClassificationHead"
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
