"""The distillation loss: the top-k KL family (pure), its chunked form, and the switch between them."""
