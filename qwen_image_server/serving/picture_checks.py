"""Which pictures a generation request sends, checked against each other and the model before
anything is decoded: a picture to start from (image-to-image, with a mask: inpainting), control
images for the model's ControlNet, or a control image with a mask (ControlNet inpainting). Each
refusal is a 400 naming the field."""

from __future__ import annotations

from qwen_image_server import errors
from qwen_image_server.protocol.common import MAX_CONTROL_IMAGES, ControlFields, PromptFields, StartImageFields
from qwen_image_server.serving.model_registry import ModelChoice


def pictures_sent(body: PromptFields, model: ModelChoice) -> tuple[str | None, str | None, list[str]]:
    """The request's start picture, mask and control images (base64), once they make sense
    together and for `model`."""
    start = body if isinstance(body, StartImageFields) else None
    control = body if isinstance(body, ControlFields) else None
    image = start.image if start is not None else None
    mask = start.mask if start is not None else None
    controls: list[str] = control.control_images if control is not None else []
    if start is not None and image is None:
        if mask is not None and not controls:
            raise errors.InvalidRequest(
                "A mask says which part of a picture to change: send the picture too, as 'image' "
                "(inpainting) or as 'control_image' (ControlNet inpainting).",
                param="mask", code="mask_without_image")
        if start.strength is not None:
            raise errors.InvalidRequest("'strength' says how far to move from 'image'; send the image too.",
                                        param="strength", code="strength_without_image")
    if control is not None and not controls and control.control_settings_given:
        raise errors.InvalidRequest(
            f"{', '.join(control.control_settings_given)} steer a ControlNet, which needs a control image "
            "('control_image').", param="control_image", code="missing_control_image")
    if control is not None and controls:
        if image is not None:
            raise errors.InvalidRequest(
                "A request either starts from a picture ('image') or is steered by a control image "
                "('control_image'), not both (with 'mask', 'control_image' is the picture a ControlNet "
                "inpaints).", param="control_image", code="control_with_image")
        if mask is not None:
            _check_controlnet_inpainting(control, model)
        else:
            _check_control_images(control, model)
    return image, mask, controls


def _check_controlnet_inpainting(control: ControlFields, model: ModelChoice) -> None:
    """A control image with a mask asks the model's inpainting ControlNet to repaint that
    picture: one picture, one scale (it runs alone)."""
    if not model.inpaint_controlnet:
        raise errors.InvalidRequest(
            f"A mask with a control image asks for ControlNet inpainting, and the model '{model.name}' is "
            "served without an inpainting ControlNet; declare one (e.g. InstantX/Qwen-Image-ControlNet-"
            "Inpainting) with QWEN_IMAGE_CONTROLNETS, or send the picture as 'image' to inpaint without one.",
            param="mask", code="no_inpaint_controlnet")
    if len(control.control_images) > 1:
        raise errors.InvalidRequest(
            f"ControlNet inpainting repaints one picture; {len(control.control_images)} control images were sent.",
            param="control_image", code="too_many_control_images")
    if len(control.control_scales) > 1:
        raise errors.InvalidRequest(
            "ControlNet inpainting runs one ControlNet: give 'controlnet_conditioning_scale' one value.",
            param="controlnet_conditioning_scale", code="too_many_controlnet_scales")


def _check_control_images(control: ControlFields, model: ModelChoice) -> None:
    """Control images steer the model's ControlNet: one, or several (a union ControlNet's
    conditions) with one scale for them all or one each."""
    if not model.controlnet:
        raise errors.InvalidRequest(
            f"The model '{model.name}' is served without a ControlNet that follows control images, so it "
            "takes none; declare one with QWEN_IMAGE_CONTROLNETS (see /v1/models' tasks).",
            param="control_image", code="no_controlnet")
    images, scales = len(control.control_images), len(control.control_scales)
    if images > MAX_CONTROL_IMAGES:
        raise errors.InvalidRequest(
            f"{images} control images were sent; a request takes at most {MAX_CONTROL_IMAGES} (each costs a "
            "ControlNet pass per step).", param="control_image", code="too_many_control_images")
    if scales not in (1, images):
        raise errors.InvalidRequest(
            f"{scales} values of 'controlnet_conditioning_scale' were sent with {images} control image"
            f"{'s' if images > 1 else ''}: send one for them all, or one per control image.",
            param="controlnet_conditioning_scale", code="controlnet_scale_count_mismatch")
