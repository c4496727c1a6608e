"""Stage 1: Roboflow exports -> annotation records with loc + seg tokens (`paliseg convert`, `paliseg validate`).

detect.read_export(path)  -> SourceSplits (one reader per format: coco, yolo, paligemma_jsonl, mask_folder)
convert.convert(config)   -> DIR/_annotations.<split>.jsonl + images/ + masks/ + conversion.json, and/or a TFDS
                             dataset (output: the writers; beam: the same conversion as an Apache Beam pipeline)
validate.validate(DIR)    -> per-split checks with file:line problems
sam.BoxSegmenter          -> masks for box-only objects (one SAM image embedding per image)
layouts / synthetic       -> the same data written in every Roboflow layout, for tests and demos
"""
