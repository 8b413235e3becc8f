"""Layer 2, images: datasets as uint8 tensors, batched augmentation, the streamed path, common corruptions."""
