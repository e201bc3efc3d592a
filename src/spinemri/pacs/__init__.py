"""The hospital loop: MR studies from a DICOMweb server graded and reported back as DICOM SR."""
