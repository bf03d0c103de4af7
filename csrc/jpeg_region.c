/* maefast._jpeg: decode only the rows and columns of a JPEG that a crop needs (libjpeg-turbo).

   decode_region(data, k, top, left, height, width) -> bytearray of height x width x 3 RGB, the
   pixels [top, top + height) x [left, left + width) of the image decoded at 1/k (k in 1, 2, 4, 8;
   coordinates in the reduced image), equal bit for bit to the same window of a full decode with
   the decoder settings Pillow uses (accurate integer IDCT, smooth chroma upsampling: libjpeg's
   defaults). The decoder skips the rows above the window (entropy decoding only: no IDCT,
   upsampling or colour conversion), stops after its last row, and converts only the iMCU columns
   the window touches (jpeg_skip_scanlines, jpeg_crop_scanline: libjpeg-turbo >= 1.5; the loader
   uses this reader from 2.1, what it is tested on). The window
   is widened by one iMCU on each side inside the decoder and cut back when copied out, so the
   smooth upsampling at its edges reads the same neighbours as in a full decode
   (tests/test_jpeg_reader.py checks the equality on every subsampling, scale and edge).

   Raises ValueError when libjpeg reports an error or a warning (a damaged file: the caller lets
   Pillow decide), and IndexError when the window is outside the reduced image. The rows below the
   window are never decoded, so a file whose damage lies there would pass where a whole decode fails
   (Pillow refuses a truncated file whatever the crop): a single-scan file must also show, after the
   rows read, entropy-coded data (stuffed bytes, restart markers) up to an end-of-image marker, else
   it is reported damaged (`scan_ends_cleanly`). A multi-scan (progressive) file is read whole by
   libjpeg before its first row anyway; one whose scans stop before every coefficient is complete
   (legal: Pillow decodes it, smoothing the missing coefficients) is reported damaged too, as
   libjpeg-turbo's block smoothing has changed between versions (2.1 vs 3.x: up to 3 levels) and
   this library need not be the one inside Pillow. YCbCr and grey JPEGs only (the
   caller checks the colour space first); grey comes out as RGB with R = G = B, as Pillow's
   convert("RGB"). The GIL is released while decoding. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <setjmp.h>
#include <stdio.h>
#include <string.h>

#include <jpeglib.h>

typedef struct {
  struct jpeg_error_mgr pub;
  jmp_buf jump;
  char message[JMSG_LENGTH_MAX];
} ErrorManager;

static void on_error(j_common_ptr cinfo) {
  ErrorManager *err = (ErrorManager *)cinfo->err;
  (*cinfo->err->format_message)(cinfo, err->message);
  longjmp(err->jump, 1);
}

/* libjpeg calls this with level -1 for a warning (corrupt data it can step over): strict, as
   simplejpeg's strict=True, so that Pillow gives its own verdict on such a file */
static void on_message(j_common_ptr cinfo, int level) {
  if (level < 0) on_error(cinfo);
}

/* Whether the single scan's remaining entropy-coded bytes run into an EOI marker: after the rows
   read, only data bytes, stuffed 0xFF00, fill 0xFF and RSTn until 0xFFD9. A truncated file has no
   EOI; any other marker (junk between the scan and EOI) is left to Pillow's verdict. */
static int scan_ends_cleanly(j_decompress_ptr cinfo) {
  int m = cinfo->unread_marker; /* a marker the entropy decoder stopped at */
  if (m != 0 && !(m >= 0xD0 && m <= 0xD7)) return m == 0xD9;
  const unsigned char *p = cinfo->src->next_input_byte;
  const unsigned char *end = p + cinfo->src->bytes_in_buffer;
  while (p < end) {
    const unsigned char *ff = (const unsigned char *)memchr(p, 0xFF, (size_t)(end - p));
    if (ff == NULL) return 0;
    p = ff + 1;
    while (p < end && *p == 0xFF) p++;
    if (p == end) return 0;
    if (*p == 0xD9) return 1;
    if (*p != 0x00 && !(*p >= 0xD0 && *p <= 0xD7)) return 0;
    p++;
  }
  return 0;
}

/* Grey, or YCbCr with luma sampled 1x1, 2x1 or 2x2 and chroma 1x1 (4:4:4, 4:2:2, 4:2:0: nearly every
   photograph): the samplings whose windows tests/test_jpeg_reader.py and the loader's check against
   Pillow compare with a whole decode. Any other is read from its first row at full width (libjpeg-
   turbo's skipping has had sampling-specific bugs), still stopping after the window. */
static int common_sampling(j_decompress_ptr cinfo) {
  if (cinfo->num_components == 1) return 1;
  if (cinfo->num_components != 3) return 0;
  jpeg_component_info *c = cinfo->comp_info;
  if (c[1].h_samp_factor != 1 || c[1].v_samp_factor != 1 || c[2].h_samp_factor != 1 || c[2].v_samp_factor != 1)
    return 0;
  return (c[0].h_samp_factor == 1 && c[0].v_samp_factor == 1) || (c[0].h_samp_factor == 2 && c[0].v_samp_factor <= 2);
}

/* Whether a progressive file's scans left some coefficient without its last bits (coef_bits: -1 never
   sent, > 0 the successive-approximation bit still missing; 0 complete). */
static int incomplete_progressive(j_decompress_ptr cinfo) {
  if (!cinfo->progressive_mode || cinfo->coef_bits == NULL) return 0;
  for (int c = 0; c < cinfo->num_components; c++)
    for (int i = 0; i < DCTSIZE2; i++)
      if (cinfo->coef_bits[c][i] != 0) return 1;
  return 0;
}

static int decode(const unsigned char *data, size_t size, int k, int top, int left, int height,
                  int width, unsigned char *out, char *message) {
  struct jpeg_decompress_struct cinfo;
  ErrorManager err;
  /* volatile: read after a longjmp */
  unsigned char *volatile row = NULL;
  cinfo.err = jpeg_std_error(&err.pub);
  err.pub.error_exit = on_error;
  err.pub.emit_message = on_message;
  err.message[0] = '\0';
  if (setjmp(err.jump)) {
    free(row);
    jpeg_destroy_decompress(&cinfo);
    snprintf(message, JMSG_LENGTH_MAX, "%s", err.message[0] ? err.message : "libjpeg error");
    return -1;
  }
  jpeg_create_decompress(&cinfo);
  jpeg_mem_src(&cinfo, data, (unsigned long)size);
  jpeg_read_header(&cinfo, TRUE);
  if (cinfo.jpeg_color_space != JCS_YCbCr && cinfo.jpeg_color_space != JCS_GRAYSCALE) {
    snprintf(message, JMSG_LENGTH_MAX, "colour space %d is not YCbCr or grey", (int)cinfo.jpeg_color_space);
    jpeg_destroy_decompress(&cinfo);
    return -1;
  }
  cinfo.out_color_space = JCS_RGB;
  cinfo.scale_num = 1;
  cinfo.scale_denom = (unsigned int)k;
  cinfo.dct_method = JDCT_ISLOW;
  cinfo.do_fancy_upsampling = TRUE;
  jpeg_start_decompress(&cinfo);
  if (incomplete_progressive(&cinfo)) {
    snprintf(message, JMSG_LENGTH_MAX, "a progressive file whose coefficients are incomplete (Pillow's to smooth)");
    jpeg_destroy_decompress(&cinfo);
    return -1;
  }
  if (top < 0 || left < 0 || (long long)top + height > (long long)cinfo.output_height ||
      (long long)left + width > (long long)cinfo.output_width) {
    snprintf(message, JMSG_LENGTH_MAX, "window (top %d, left %d, %d x %d) outside the %u x %u image at 1/%d",
             top, left, height, width, cinfo.output_height, cinfo.output_width, k);
    jpeg_destroy_decompress(&cinfo);
    return -2; /* our caller's bug, not the file's: IndexError */
  }
  /* one iMCU of margin each side (in output pixels): the smooth upsampling's neighbours */
  int imcu_w = cinfo.max_h_samp_factor * cinfo.min_DCT_scaled_size;
  int imcu_h = cinfo.max_v_samp_factor * cinfo.min_DCT_scaled_size;
  int x0 = left - imcu_w < 0 ? 0 : left - imcu_w;
  int x1 = left + width + imcu_w > (int)cinfo.output_width ? (int)cinfo.output_width : left + width + imcu_w;
  int y0 = top - imcu_h < 0 ? 0 : top - imcu_h;
  int y1 = top + height + imcu_h > (int)cinfo.output_height ? (int)cinfo.output_height : top + height + imcu_h;
  if (!common_sampling(&cinfo)) { /* skip and crop only where the tests and the loader's check look */
    x0 = 0;
    x1 = (int)cinfo.output_width;
    y0 = 0;
  }
  JDIMENSION xoffset = (JDIMENSION)x0, cwidth = (JDIMENSION)(x1 - x0);
  if (x0 > 0 || x1 < (int)cinfo.output_width) jpeg_crop_scanline(&cinfo, &xoffset, &cwidth);
  /* jpeg_crop_scanline moves xoffset down to an iMCU boundary and sets output_width */
  int shift = left - (int)xoffset;
  row = (unsigned char *)malloc((size_t)cinfo.output_width * 3);
  if (row == NULL) {
    snprintf(message, JMSG_LENGTH_MAX, "out of memory");
    jpeg_destroy_decompress(&cinfo);
    return -1;
  }
  if (y0 > 0) jpeg_skip_scanlines(&cinfo, (JDIMENSION)y0);
  JSAMPROW rows[1] = {row};
  for (int y = y0; y < y1; y++) {
    jpeg_read_scanlines(&cinfo, rows, 1);
    if (y >= top && y < top + height)
      memcpy(out + (size_t)(y - top) * width * 3, row + (size_t)shift * 3, (size_t)width * 3);
  }
  free(row);
  row = NULL;
  if (!jpeg_has_multiple_scans(&cinfo) && !scan_ends_cleanly(&cinfo)) {
    snprintf(message, JMSG_LENGTH_MAX, "no end-of-image marker after the scan's data (truncated or damaged)");
    jpeg_destroy_decompress(&cinfo);
    return -1;
  }
  jpeg_abort_decompress(&cinfo); /* the rows below the window are never decoded */
  jpeg_destroy_decompress(&cinfo);
  return 0;
}

static PyObject *decode_region(PyObject *self, PyObject *args) {
  Py_buffer data;
  int k, top, left, height, width;
  (void)self;
  if (!PyArg_ParseTuple(args, "y*iiiii:decode_region", &data, &k, &top, &left, &height, &width)) return NULL;
  if (k != 1 && k != 2 && k != 4 && k != 8) {
    PyBuffer_Release(&data);
    return PyErr_Format(PyExc_ValueError, "decode_region: k must be 1, 2, 4 or 8, got %d", k);
  }
  if (height < 1 || width < 1) {
    PyBuffer_Release(&data);
    return PyErr_Format(PyExc_ValueError, "decode_region: the window must be at least 1 x 1, got %d x %d",
                        height, width);
  }
  if (top < 0 || left < 0 || height > JPEG_MAX_DIMENSION || width > JPEG_MAX_DIMENSION) {
    PyBuffer_Release(&data); /* before the output's allocation: no JPEG is that large */
    return PyErr_Format(PyExc_IndexError, "decode_region: window (top %d, left %d, %d x %d) outside any JPEG",
                        top, left, height, width);
  }
  PyObject *out = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)height * width * 3);
  if (out == NULL) {
    PyBuffer_Release(&data);
    return NULL;
  }
  char message[JMSG_LENGTH_MAX];
  int rc;
  unsigned char *dst = (unsigned char *)PyByteArray_AS_STRING(out);
  Py_BEGIN_ALLOW_THREADS
  rc = decode((const unsigned char *)data.buf, (size_t)data.len, k, top, left, height, width, dst, message);
  Py_END_ALLOW_THREADS
  PyBuffer_Release(&data);
  if (rc != 0) {
    Py_DECREF(out);
    return PyErr_Format(rc == -2 ? PyExc_IndexError : PyExc_ValueError, "decode_region: %s", message);
  }
  return out;
}

static PyMethodDef methods[] = {
    {"decode_region", decode_region, METH_VARARGS,
     "decode_region(data, k, top, left, height, width) -> bytearray (height x width x 3 RGB) of the "
     "JPEG decoded at 1/k, the window only."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_jpeg",
                                    "Windowed JPEG decoding with libjpeg-turbo (csrc/jpeg_region.c).", -1,
                                    methods};

PyMODINIT_FUNC PyInit__jpeg(void) {
  PyObject *m = PyModule_Create(&module);
  if (m != NULL && PyModule_AddIntConstant(m, "LIBJPEG_TURBO_VERSION_NUMBER",
#ifdef LIBJPEG_TURBO_VERSION_NUMBER
                                           LIBJPEG_TURBO_VERSION_NUMBER
#else
                                           0
#endif
                                           ) < 0) {
    Py_DECREF(m);
    return NULL;
  }
  return m;
}
