"""Drawing images: noise schedules and samplers (``schedulers``) and the ``StableDiffusion``
pipeline (load, generate, save)."""
