"""From a caption to the UNet's text conditioning: the CLIP tokenizer, subject extraction
(``subjects``), prompt weight syntax, per-token weights (``conditioning``) and the one function
sampling and training share (``conditioner.TextConditioner``)."""
