"""Multi-LoRA serving: PEFT adapters applied per request on top of the base model's weights
(docs/lora.md)."""
