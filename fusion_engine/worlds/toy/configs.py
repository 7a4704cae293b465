"""Architectures of the toy world (kept in code and written beside the weights as JSON)."""
VAE = {  # one downsampling: 32x32x3 images <-> 16x16x4 latents
    "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"], "block_out_channels": [32, 64],
    "latent_channels": 4, "layers_per_block": 1, "norm_num_groups": 8, "sample_size": 32,
    "mid_block_add_attention": False,
}
UNET = {  # on 16x16 latents: levels at 16, 8 and 4 pixels, attention at every level
    "sample_size": 16, "in_channels": 4, "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64, 128], "layers_per_block": 1, "cross_attention_dim": 64,
    "attention_head_dim": 16, "norm_num_groups": 16,
}
TEXT_ENCODER = {
    "vocab_size": 49408, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "max_position_embeddings": 77, "projection_dim": 64,
    "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407,
}
SCHEDULER = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon", "timestep_spacing": "leading", "steps_offset": 1,
}
# Judges. CLIP slot: an open_clip CLIP with a word-level vocabulary of the world (see judges.tokenize).
CLIP = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "patch_size": 4, "layers": 3, "width": 64, "head_width": 32},
    "text_cfg": {"context_length": 8, "vocab_size": 32, "width": 32, "heads": 2, "layers": 1},
}
# DINO slot: a timm ViT trained to tell both the shape and the look of an image.
DINO_NAME = "vit_tiny_patch16_224"
DINO_OPTIONS = {"img_size": 32, "patch_size": 4, "depth": 3, "embed_dim": 64, "num_heads": 2}
