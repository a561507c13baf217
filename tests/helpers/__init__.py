"""What several test modules share: the gloo process runner (distributed), synthetic GLM batches
(synthetic), the relative error (numerics), the tiny model presets (presets), the small MoE
problem (moe), one clipped training run (steps), the demo-corpus constants (data) and the
``train.py`` launcher (train_app). Test modules import from here, never from one another."""
