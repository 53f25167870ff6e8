"""Write the corpus files whose exact bytes matter (encodings, binary, CRLF).

The committed files are the output of this script; run it from anywhere to recreate them:
`python tests/bad_inputs/make_binary.py`. The plain-text corpus files are edited by hand.
"""

from pathlib import Path

HERE = Path(__file__).resolve().parent
ROWS = (
    "text,label\nnaïve café review,pos\nawful film,neg\nrésumé of a fine film,pos\n"
    "bad film,neg\n"
)

FILES = {
    "empty.csv": b"",
    # A zip container's local-file header, as in every .xlsx, then some junk.
    "fake_xlsx.csv": b"PK\x03\x04\x14\x00\x06\x00\x08\x00\x00\x00!\x00[Content_Types].xml",
    # The OLE2 compound-file signature of a legacy .xls.
    "fake_xls.csv": b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(24),
    # A PNG signature and IHDR chunk start, named .csv.
    "image.csv": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06",
    # Text-looking start, then NUL bytes in no UTF-16 pattern.
    "binary_nul.csv": b"text,label\nabc\x00\x00\x00\x01\x02\x03def\x00,pos\n",
    # No NUL, no BOM, but mostly control bytes: no encoding turns this into text.
    "undecodable.csv": bytes(range(1, 32)) * 4 + b"\x7f\x81\x8d\x8f\x90\x9d",
    # A UTF-16 byte-order mark, then an odd number of bytes: a truncated UTF-16 file.
    "utf16_truncated.csv": b"\xff\xfe" + "text,label\nok,pos\n".encode("utf-16-le") + b"\x41",
    "utf16_le_bom.csv": b"\xff\xfe" + ROWS.encode("utf-16-le"),
    "utf16_be_bom.csv": b"\xfe\xff" + ROWS.encode("utf-16-be"),
    "utf16_le_nobom.csv": ROWS.encode("utf-16-le"),
    "latin1.csv": ROWS.encode("latin-1"),
    "utf8_bom.csv": b"\xef\xbb\xbf" + ROWS.encode("utf-8"),
    "crlf.csv": ROWS.replace("\n", "\r\n").encode("utf-8"),
}

if __name__ == "__main__":
    for name, data in FILES.items():
        (HERE / name).write_bytes(data)
    print(f"wrote {len(FILES)} files to {HERE}")
