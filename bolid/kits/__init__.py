"""Kits: interchangeable sets of every component BoLID uses, chosen with ``components: <kit>``.

``bolid.components.load(name, kit)`` calls ``bolid.kits.<kit>.<name>(source, **options)``:

==========  ==========================================================================================
``real``    :mod:`bolid.kits.real`: the pretrained weights, by hub id or local path
``tiny``    :mod:`bolid.kits.tiny`: small random-init twins of the same classes (tests, demo, benches)
``random``  ``bolid.kits.random``: real-size models, random init (memory and speed without weights)
``mini``    ``bolid.kits.mini``: a small trained world (the method learning somewhere small)
==========  ==========================================================================================

**Builder contract.** A kit is a module that defines these functions (a kit may lack some; loading a
missing one is a clear ``ValueError``). ``source`` is the first positional argument of every builder: a hub id
or local path for kits that load weights (``None``: the default), ignored by kits built in-process. Options a
kit has no use for (``torch_dtype``, ``variant``, ``pretrained``) are accepted and ignored. Models come back
frozen-ready (``eval()``); callers move and cast them.

==========================  ================================================  ==================================
builder                     returns                                           classes
==========================  ================================================  ==================================
``sdxl(source, torch_dtype  ``dict`` for ``StableDiffusionXLPipeline(**d)``:  diffusers
=float32, variant=None)``   ``unet, vae, text_encoder, text_encoder_2,
                            tokenizer, tokenizer_2, scheduler,
                            image_encoder, feature_extractor``
``sdxl_lightning_unet(      the SDXL-Lightning UNet for ``base_unet``'s       ``UNet2DConditionModel``
source, *, base_unet)``     config
``sdxl_lightning_lora(      ``None``: loads the SDXL-Lightning LoRA into       PEFT LoRA (diffusers loading)
source, *, unet)``          ``unet``, switched off
                            (:mod:`bolid.lightning_lora`)
``person_detector(source)``  ``(model, image_processor)``                     ``RTDetrForObjectDetection``
``vitpose(source)``         ``(model, image_processor)``                      ``VitPoseForPoseEstimation``
``blip2(source,             ``(model, processor)``                            ``Blip2ForConditionalGeneration``
torch_dtype=float32)``
``eva_clip(source,          ``(model, preprocess, tokenizer, name)``; ``name``  open_clip EVA02
pretrained=None)``          is recorded in adapters and must rebuild this
                            encoder through the same kit
``clip(source)``            ``(model, processor)``                            ``CLIPModel``, ``CLIPProcessor``
==========================  ================================================  ==================================

Optional: ``sdxl_unet(source, torch_dtype=float32)``, the base UNet alone (``bolid.components.load_unet`` uses
it when present, else the ``unet`` of ``sdxl``), for kits where loading the whole of SDXL costs much more.

A kit whose EVA-CLIP ``name`` is not a real open_clip architecture sets ``EVA_CLIP_NAME`` to it, so that
:func:`bolid.components.image_encoder_kit` finds the kit again when an adapter is loaded.
Builders are deterministic: a kit that draws random weights seeds them itself.
"""
