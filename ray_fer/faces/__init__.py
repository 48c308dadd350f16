"""Faces in photos: the MTCNN detector and alignment (`detector`), the --faces option and the
detector's install checks (`options`), and the face stage's own crops for training (`views`)."""
