"""Faces in photos: find them and their landmarks (``detect``, dlib), align each to the training framing
(``align``), paste the network's outputs back into the enlarged photo (``paste``), and the folder driver of
`facesr sr` (``photos``). ``facesr.upscaler.Upscaler`` puts them together."""
