"""Third-party code kept verbatim apart from what inference needs (see each file's header and
LICENSE): MTCNN from facenet-pytorch 2.6.0 (MIT). Its weights come from the facenet-pytorch
wheel, installed without its dependencies, and are checked by SHA-256 before use."""
