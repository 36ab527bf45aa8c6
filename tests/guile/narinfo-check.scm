;;; narinfo-check.scm -- check narinfos from guixsvc with upstream's own parser and
;;; signature check.
;;;
;;; This is guixsvc's own test code; it uses the upstream (guix narinfo), (guix pki) and
;;; (guix scripts substitute) modules, which are NOT part of this repository (run it with
;;; /work/guile-client/run.sh or another Guix source tree on the load path).
;;;
;;;   run.sh tests/guile/narinfo-check.scm ACL-FILE CACHE-URL EXPECT FILE...
;;;
;;; Reads each FILE (a narinfo body) with `read-narinfo', evaluates `valid-narinfo?' against
;;; the ACL in ACL-FILE, and compares with EXPECT ("valid" or "invalid").  For valid ones it
;;; also prints what `narinfo-best-uri' chooses.  Prints "ok FILE ..." or "FAIL FILE ...";
;;; exits 1 if anything failed.

(use-modules (guix narinfo)
             (guix pki)
             (gcrypt pk-crypto)
             (guix scripts substitute)
             (web uri)
             (ice-9 match)
             (ice-9 rdelim)
             (ice-9 format))

(define (read-acl file)
  (call-with-input-file file
    (lambda (port)
      (canonical-sexp->sexp (string->canonical-sexp (read-string port))))))

(define failures 0)

(match (command-line)
  ((_ acl-file cache-url expect files ...)
   (let ((acl (read-acl acl-file)))
     (for-each
      (lambda (file)
        (let* ((narinfo (call-with-input-file file
                          (lambda (port) (read-narinfo port cache-url))))
               (valid? (valid-narinfo? narinfo acl #:verbose? #t))
               (wanted? (string=? expect "valid")))
          (if (eq? (not valid?) (not wanted?))
              (call-with-values (lambda () (narinfo-best-uri narinfo))
                (lambda (uri compression size)
                  (format #t "ok ~a ~a ~a ~a ~a ~a~%" file (if valid? "valid" "invalid")
                          (narinfo-path narinfo) (narinfo-size narinfo)
                          (uri->string uri) compression)))
              (begin
                (set! failures (+ failures 1))
                (format #t "FAIL ~a: valid-narinfo? returned ~a~%" file valid?)))))
      files)
     (exit (if (zero? failures) 0 1))))
  (_
   (format (current-error-port) "usage: narinfo-check.scm ACL CACHE-URL EXPECT FILE...~%")
   (exit 2)))
