"""Drawing images: noise schedules and samplers (``schedulers``) and the ``StableDiffusion``
pipeline (load, generate, save)."""

# The sampler names, here so command lines can offer them without importing JAX.
SAMPLERS = ("ddim", "euler", "euler_a", "dpm++2m")
