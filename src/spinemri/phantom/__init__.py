"""A synthetic lumbar-spine MRI phantom written in exactly the RSNA 2024 LSDC layout.

Each study is a small anatomical model (vertebral bodies T12-S1, discs, the spinal canal, the
neural foramina and the subarticular recesses) whose geometry depends on the study's labels:
spinal canal stenosis narrows the canal at its level, foraminal narrowing shrinks the foramen on
its side, subarticular stenosis narrows the recess on its side. The model is rendered into real
DICOM files (Sagittal T1, Sagittal T2/STIR, Axial T2) with per-study nuisance (field of view,
pixel spacing, image size, rotation, intensity scale, bias field, Rician noise), and every label's
coordinate points at the pixel where its anatomy is drawn. Same seed, same bytes.
"""

from spinemri.phantom.generate import synthesize
from spinemri.phantom.labels import label_table, sample_labels
from spinemri.phantom.render import image_size, sagittal_slice_count, sequence_tags, series_plan
from spinemri.phantom.settings import MARKER, PROFILES, PhantomConfig, PhantomSummary, SliceCount, profile

__all__ = ["MARKER", "PROFILES", "PhantomConfig", "PhantomSummary", "SliceCount", "image_size", "label_table", "profile",
           "sagittal_slice_count", "sample_labels", "sequence_tags", "series_plan", "synthesize"]
